"""attnc.inspect and the launch recording under it: the jobs carry what the launchers would
launch on a GPU (configurations from the launchers' own functions, key splits, specialization
as Triton's), and one small compile reads back a report of the promised structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import attnc
from attnc import inspect
from attnc.backends.triton import aot_check, aot_jobs
from attnc.backends.triton.aot_jobs import Shape
from attnc.backends.triton.linear import launch as linear_launch
from attnc.backends.triton.softmax import launch as softmax_launch

CUDA = torch.device("cuda")
KEYS = {"kernel", "config", "registers", "spill_bytes", "shared_bytes", "fits", "mma",
        "loop_instructions", "loop_mix"}


def _by_kernel(jobs):
    return {j["kernel"]: j for j in jobs}


def _options(config) -> dict:
    return {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def test_softmax_jobs_launch_the_launchers_configurations():
    jobs = _by_kernel(aot_jobs.kernel_jobs(attnc.load("causal")))
    forward = softmax_launch.default_config(128, 128, torch.bfloat16, CUDA)
    roles = softmax_launch.role_configs(softmax_launch.backward_config(forward, torch.bfloat16,
                                                                       CUDA))
    assert jobs["forward"]["options"] == _options(forward)
    assert jobs["forward"]["constexprs"]["BLOCK_M"] == forward["BLOCK_M"]
    for role in ("dq", "dkdv"):
        assert jobs[role]["options"] == _options(roles[role])
        assert jobs[role]["constexprs"]["BLOCK_N"] == roles[role]["BLOCK_N"]
    assert jobs["forward"]["constexprs"]["UPCAST"] is False  # the interpreter's switch is off
    assert jobs["forward"]["args"]["Q"] == {"pointer": "bfloat16", "offset": 0}
    assert jobs["forward"]["args"]["stride_qh"] == 4096 * 128
    # one query head of 4096 rows: 32 programs leave an H100 idle, so the keys are split
    few = _by_kernel(aot_jobs.kernel_jobs(attnc.load("causal"), Shape(B=1, H=1),
                                          backward=False))["forward"]
    splits = softmax_launch.kv_splits(32, 4096, aot_jobs.SMS)
    assert splits > 1 and few["config"]["kv_splits"] == splits
    assert few["args"]["Out"]["pointer"] == "float32"
    assert few["args"]["KV_SPLIT"] == 4096 // splits


def test_fixed_launch_options_reach_both_backward_kernels():
    """block_n= fixes the dq kernel's key step (by default 32) as it fixes the dk/dv kernel's
    key tile, in inspect's jobs as in the runtime (launch.backward_overrides)."""
    jobs = _by_kernel(aot_jobs.kernel_jobs(attnc.compile("causal", block_n=64)))
    assert softmax_launch.BACKWARD_STEP != 64
    for role in ("forward", "dq", "dkdv"):
        assert jobs[role]["constexprs"]["BLOCK_N"] == 64


def test_linear_jobs_launch_the_launchers_tiles_and_core_configuration():
    kernel = attnc.load("gated_delta_net")
    jobs = _by_kernel(aot_jobs.kernel_jobs(kernel))
    plan = kernel.plan
    assert jobs["chunked"]["constexprs"]["BT"] == linear_launch.chunk_tile(plan, 128)
    assert jobs["chunked"]["constexprs"]["BV"] == linear_launch.value_tile(plan, 128, 128)
    assert jobs["chunked"]["options"] == _options(linear_launch.default_config(plan, 128, 128))
    core = [j for j in jobs.values() if j["function"] == "core_backward"]
    assert len(core) == 1 and core[0]["args"]["NV_STRIDE"] == 4 * 16 * 4096
    assert core[0]["constexprs"]["DELTA"] is True and core[0]["options"]["num_warps"] > 0


def test_specialization_by_rule_matches_tritons_binder(tmp_path):
    """aot_check specializes through Triton's own binder; its fallback rule (for a Triton whose
    binder it does not know) gives the same signature, constants and attributes."""
    jobs = aot_jobs.kernel_jobs(attnc.load("rel_bias"), Shape(B=1, H=3, N=1000, D=72))
    jobs += aot_jobs.kernel_jobs(attnc.load("gla"), Shape(B=1, H=1, N=100, D=64),
                                 backward=False)
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    script = (
        "import importlib.util, json, sys\n"
        f"sys.path.insert(0, {os.path.dirname(aot_check.__file__)!r})\n"
        "import aot_check\n"
        "from triton.backends.compiler import GPUTarget\n"
        "same = []\n"
        "for job in json.load(open(sys.argv[1])):\n"
        "    spec = importlib.util.spec_from_file_location('m', job['path'])\n"
        "    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "    fn = getattr(m, job['function'])\n"
        "    a = aot_check.specialize(fn, job, GPUTarget('cuda', 90, 32))\n"
        "    b = aot_check._specialize_by_rule(fn, job, {**aot_check._values(job),"
        " **job['constexprs']})\n"
        "    same.append(a == b or repr([a, b]))\n"
        "print(json.dumps(same))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [True] * len(jobs)


def test_inspect_json_reports_each_kernel(capsys):
    """`attnc inspect causal --kernels forward --json` at head dim 64: one compile."""
    from attnc import cli
    assert cli.main(["inspect", "causal", "--kernels", "forward", "--D", "64", "--N", "1024",
                     "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["kernel"] for r in rows] == ["forward"]
    row = rows[0]
    assert KEYS <= set(row) and row["ok"]
    assert row["config"]["num_warps"] > 0 and row["config"]["BLOCK_M"] > 0
    assert set(row["spill_bytes"]) == {"store", "load"}
    assert 0 < row["registers"] <= 255 and row["shared_bytes"] > 0 and row["fits"] is True
    assert row["mma"]["kind"] == "wgmma" and row["mma"]["types"] == ["bf16"]
    assert 0 < row["mma"]["loop_count"] <= row["mma"]["count"]
    assert 0 < row["loop_instructions"] == sum(row["loop_mix"].values())
    assert row["loop_mix"]["MUFU.EX2"] > 0 and row["loop_mix"]["HGMMA"] > 0


def test_missing_tools_are_named(tmp_path, monkeypatch):
    """Without Triton's ptxas or cuobjdump, aot_check says which are missing (exit 3) and
    inspect raises ToolsMissing naming them."""
    monkeypatch.setattr(aot_check, "missing_tools", lambda arch=90: ["/x/bin/cuobjdump"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # aot_check.main clears it; restored after
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps([{"function": "f", "arch": 90, "inspect": True}]))
    assert aot_check.main([str(path)]) == 3
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{\"missing_tools\": [\"/x/bin/cuobjdump\"]}'\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(inspect.ToolsMissing, match="/x/bin/cuobjdump"):
        inspect.compile_jobs([{"function": "f"}], python=str(fake))


def test_arch_names():
    assert [inspect.parse_arch(a) for a in ("sm_90", "sm_90a", "90", 80)] == [90, 90, 90, 80]
    with pytest.raises(ValueError, match="sm_90"):
        inspect.parse_arch("gfx942")
