"""The `attnc` command line: every subcommand, its output and its exit status.

Most cases call `attnc.cli.main([...])` in-process and read stdout/stderr with capsys; one test
runs the installed `attnc` entry point in a subprocess. Kernels are compiled into a per-module
cache directory so the tests never touch ~/.cache/attnc.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import attnc
from attnc import cli, library, pipeline, testing

SPEC = """\
# win: causal sliding window (a test spec)
attention win {
  option window = 9
  mask = n <= m and m - n < window
}
"""

SOFTCAP = """\
attention capped {
  option cap = 5.0
  score = cap * tanh(dot(q, k) * scale / cap)
}
"""

# Well-formed, but no kernel can hold it (a [m, f] sum over n weighs V twice): the compiler
# refuses it with a CompileError.
UNSCHEDULABLE = """\
cascade linear {
  QK[m, n] = Q[m, e] * K[n, e]
  AV[m, f] = sum(n) QK[m, n] * V[n, f] * V[n, f]
}
"""

SMALL = ["--B", "1", "--H", "2", "--Hkv", "1", "--M", "20", "--N", "24", "--D", "16", "--Dv", "16"]


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.mktemp("attnc-cache")))
        yield


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("specs") / "win.attn"
    path.write_text(SPEC)
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- list / passes ------------------------------------------------------------------------------

def test_list_shows_every_variant_with_its_description(capsys):
    rc, out, err = run(capsys, "list")
    assert rc == 0
    names = library.variants()
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == names
    for name, line in zip(names, lines):
        desc = library.describe(name)
        # the description, without a leading "name:" that would repeat the name
        assert desc.removeprefix(name + ":").strip() in line
    if "causal" in names:
        assert any(line.split()[0] == "causal" and len(line.split()) > 1 for line in lines)


def test_list_with_no_variants(capsys, monkeypatch):
    monkeypatch.setattr(library, "variants", lambda: [])
    rc, out, err = run(capsys, "list")
    assert (rc, out) == (0, "")
    assert "no library variants" in err


def test_passes_lists_the_pipeline_in_order(capsys):
    rc, out, err = run(capsys, "passes")
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == " -> ".join(pipeline.STAGES)
    assert len(lines) == 2 + len(pipeline.PASSES) + len(pipeline.LINEAR_PASSES)
    for i, (p, line) in enumerate(zip(pipeline.PASSES, lines[1:]), 1):
        assert line.split()[:2] == [f"{i}.", p.name]
        assert line.endswith(p.doc)
    linear = lines[1 + len(pipeline.PASSES):]
    assert linear[0] == "linear blocks: " + " -> ".join(pipeline.LINEAR_STAGES)
    for i, (p, line) in enumerate(zip(pipeline.LINEAR_PASSES, linear[1:]), 1):
        assert line.split()[:2] == [f"{i}.", p.name]
        assert line.endswith(p.doc)


def test_cli_stage_choices_match_the_pipeline():
    show = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["show"]._actions
                if a.dest == "stage")
    assert tuple(show.choices) == pipeline.SHOW_STAGES


# --- show ---------------------------------------------------------------------------------------

MARKERS = {
    "parse": "start\n  attention\n    win",
    "cascade": "attention win",
    "desugar": "GM[m] = max(n) SM[m, n]",
    "pass_count": "pass_count win: 3 pass(es) over n",
    "online_softmax": "online_softmax(n)",
    "online_rescale": "# online_rescale left the IR unchanged",
    "mask_bounds": "key bounds per query tile",
    "tile": "schedule: grid over (b, h, m)",
    "autodiff": "dS[m, n] = (-Delta[m] + dP[m, n])*P[m, n]",
    "schedule": "# schedule left the IR unchanged",
    "fuse": "kernel win",
    "kernel": "attnc_win_bwd_dkdv (dkdv)",
    "triton": "def attnc_win_bwd_dkdv(",
}


LINEAR_MARKERS = {
    "parse": "start\n  linear\n    gated_delta_net",
    "cascade": "linear gated_delta_net   (scan over t",
    "chunk_scan": "log a_t = g",
    "tile_scan": "forward: gated_delta_net_chunked (default)",
    "kernel": "core_forward, core_backward per state",
    "triton": "def gated_delta_net_chunked(",
}


@pytest.mark.parametrize("stage", pipeline.LINEAR_STAGES)
def test_show_every_linear_stage(capsys, stage):
    assert tuple(LINEAR_MARKERS) == pipeline.LINEAR_STAGES
    rc, out, err = run(capsys, "show", "gated_delta_net", "--stage", stage)
    assert rc == 0 and err == ""
    assert LINEAR_MARKERS[stage] in out


def test_show_says_why_a_scan_is_not_chunked(capsys):
    rc, out, _ = run(capsys, "show", "flowformer", "--stage", "chunk_scan")
    assert rc == 0
    assert "recurrent (sequential over t) -- not chunked: the update of ko reads state sq" in out


def test_show_refuses_stages_of_the_other_pipeline(capsys, spec_file):
    rc, _, err = run(capsys, "show", "gla", "--stage", "online_softmax")
    assert rc == 2 and "does not apply to linear blocks" in err
    rc, _, err = run(capsys, "show", spec_file, "--stage", "chunk_scan")
    assert rc == 2 and "does not apply to attention and cascade blocks" in err


def test_check_a_linear_spec(capsys):
    rc, out, err = run(capsys, "check", "simple_gla", "--M", "21", "--D", "16", "--Dv", "16",
                       "--B", "1", "--H", "2")
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["chunked", "recurrent"]
    assert all(line.endswith(": ok") for line in lines)


def test_markers_cover_every_stage():
    assert tuple(MARKERS) == pipeline.STAGES


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_show_every_stage(capsys, spec_file, stage):
    rc, out, err = run(capsys, "show", spec_file, "--stage", stage)
    assert rc == 0 and err == ""
    assert MARKERS[stage] in out
    assert out.rstrip("\n") == pipeline.show(pipeline.read_spec(spec_file), stage).rstrip("\n")
    assert out.endswith("\n")


def test_show_defaults_to_kernel(capsys, spec_file):
    rc, out, _ = run(capsys, "show", spec_file)
    assert rc == 0
    assert out == run(capsys, "show", spec_file, "--stage", "kernel")[1]


def test_show_library_variant_by_name(capsys):
    if "causal" not in library.variants():
        pytest.skip("variants/causal.attn not written yet")
    rc, out, _ = run(capsys, "show", "causal", "--stage", "cascade")
    assert rc == 0 and "attention causal" in out


def test_show_dsl_text(capsys):
    rc, out, _ = run(capsys, "show", SOFTCAP, "--stage", "cascade")
    assert rc == 0 and "attention capped" in out


def test_option_override_int(capsys, spec_file):
    rc, out, _ = run(capsys, "show", spec_file, "--stage", "cascade", "-O", "window=3")
    assert rc == 0
    src = pipeline.read_spec(spec_file)
    assert out.rstrip("\n") == pipeline.show(src, "cascade", {"window": 3}).rstrip("\n")
    assert out.rstrip("\n") != pipeline.show(src, "cascade").rstrip("\n")


def test_option_override_float_and_repeated(capsys):
    rc, out, _ = run(capsys, "show", SOFTCAP, "--stage", "cascade",
                     "-O", "cap=7", "--option", "cap=2.5")  # the last one wins
    assert rc == 0
    assert out.rstrip("\n") == pipeline.show(
        pipeline.read_spec(SOFTCAP), "cascade", {"cap": 2.5}).rstrip("\n")


def test_show_ignores_launch_options(capsys, spec_file):
    rc, out, _ = run(capsys, "show", spec_file, "-O", "block_m=32", "-O", "num_warps=4")
    assert rc == 0 and "kernel win" in out


@pytest.mark.parametrize("argv, message", [
    (["-O", "nope=1"], "unknown option 'nope'; this spec declares: window"),
    (["-O", "window=2.5"], "option window is an integer option, got 2.5"),
])
def test_bad_option_values_exit_2(capsys, spec_file, argv, message):
    rc, out, err = run(capsys, "show", spec_file, *argv)
    assert rc == 2 and out == ""
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("opt, message", [
    ("window", "expected name=value"),
    ("=3", "expected name=value"),
    ("window=", "expected name=value"),
    ("window=abc", "option window: value must be a number, got 'abc'"),
])
def test_malformed_option_flag_exits_2(capsys, spec_file, opt, message):
    rc, out, err = run(capsys, "show", spec_file, "-O", opt)
    assert rc == 2 and out == ""
    assert message in err


def test_unknown_stage_exits_2(capsys, spec_file):
    rc, _, err = run(capsys, "show", spec_file, "--stage", "nope")
    assert rc == 2 and "invalid choice: 'nope'" in err


def test_unknown_spec_name_exits_2(capsys):
    rc, out, err = run(capsys, "show", "no_such_variant")
    assert rc == 2 and out == ""
    assert err.startswith(
        "no_such_variant: no spec file or library variant named 'no_such_variant'")
    assert "hint: `attnc list` shows the library" in err
    assert "Traceback" not in err


def test_malformed_spec_exits_2_with_location(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("attention bad {\n  mask = n <= m\n  score = foo(1)\n}\n")
    rc, out, err = run(capsys, "compile", bad)
    assert rc == 2 and out == ""
    assert err.startswith(f"{bad}:3:11: unknown function 'foo'\n")
    assert "          ^" in err.splitlines()[2]


# --- compile ------------------------------------------------------------------------------------

def test_compile_prints_source(capsys, spec_file):
    rc, out, err = run(capsys, "compile", spec_file)
    assert rc == 0 and err == ""
    source = attnc.compile(str(spec_file)).source
    assert out.rstrip("\n") == source.rstrip("\n")
    assert "@triton.jit" in out and f"Generated by attnc from {spec_file}" in out


def test_compile_writes_file(capsys, spec_file, tmp_path):
    dest = tmp_path / "win_kernel.py"
    rc, out, err = run(capsys, "compile", spec_file, "-o", dest)
    assert rc == 0 and out == ""
    assert str(dest) in err
    text = dest.read_text()
    assert text == attnc.compile(str(spec_file)).source
    compile(text, str(dest), "exec")  # valid Python


def test_compile_with_option_override(capsys, spec_file):
    rc, out, _ = run(capsys, "compile", spec_file, "--option", "window=3", "-O", "block_m=32")
    assert rc == 0
    kernel = attnc.compile(str(spec_file), window=3, block_m=32)
    assert out.rstrip("\n") == kernel.source.rstrip("\n")


def test_compile_bad_launch_option_exits_2(capsys, spec_file):
    rc, out, err = run(capsys, "compile", spec_file, "-O", "block_m=20")
    assert rc == 2 and out == ""
    assert "block_m must be a power of two >= 16, got 20" in err and "Traceback" not in err


def test_compile_error_exits_2_at_the_refused_statement(capsys):
    rc, out, err = run(capsys, "compile", UNSCHEDULABLE)
    assert rc == 2 and out == ""
    assert err.startswith("<spec>:3:3: linear: AV cannot be scheduled")
    assert "\n      AV[m, f] = sum(n) QK[m, n] * V[n, f] * V[n, f]\n      ^" in err
    assert "Traceback" not in err


def test_compile_unwritable_output_exits_2(capsys, spec_file, tmp_path):
    rc, _, err = run(capsys, "compile", spec_file, "-o", tmp_path / "missing" / "k.py")
    assert rc == 2 and "attnc: error:" in err


# --- check --------------------------------------------------------------------------------------

def test_check_passes_on_a_correct_spec(capsys, spec_file):
    rc, out, err = run(capsys, "check", spec_file, *SMALL)
    assert rc == 0, out + err
    assert out.startswith("win (float32): relative error ")
    assert "<= tolerance 1e-04" in out and out.rstrip().endswith(": ok")


def test_check_runs_a_general_cascade_against_the_interpreter(capsys):
    """A non-softmax normalizer (stage kernels): its output and its gradients, the latter
    against torch autograd through the reference interpreter."""
    rc, out, err = run(capsys, "check", "relu_attn", *SMALL)
    assert rc == 0, out + err
    assert out.startswith("relu_attn (float32): relative error ") and "gradients" in out
    assert out.rstrip().endswith(": ok")


def test_show_schedule_lists_a_general_cascades_kernels(capsys):
    rc, out, _ = run(capsys, "show", "sinkhorn", "-O", "iters=1", "--stage", "schedule")
    assert rc == 0
    assert "schedule: 3 kernel(s)" in out
    assert "kernel 2: grid over (b, h, n tiles), loop over m (ascending)" in out
    rc, out, _ = run(capsys, "show", "sinkhorn", "-O", "iters=1", "--stage", "pass_count")
    # each row and column log-sum-exp is a max pass then a sum pass, until the sums are
    # rescaled by running maxima: the count before and after each rewrite
    assert rc == 0 and "5 kernel(s)" in out.splitlines()[0]
    assert out.rstrip().endswith("after online_rescale: 2 pass(es) over n, 1 over m; 3 kernel(s)")


def test_check_passes_flags_through(capsys, spec_file, monkeypatch):
    import torch

    seen = {}

    def fake_check(kernel, **kw):
        seen.update(kw, name=kernel.name)
        return {"rel_error": 1e-3, "lse_max_abs_error": 0.0, "tolerance": 5e-3, "ok": True}

    monkeypatch.setattr(testing, "check", fake_check)
    rc, out, _ = run(capsys, "check", spec_file, "--dtype", "float16", "--seed", "7",
                     "--M", "5", "--N", "6", "-O", "window=2")
    assert rc == 0 and out.startswith("win (float16): ")
    assert seen == {"dtype": torch.float16, "seed": 7, "M": 5, "N": 6, "name": "win"}


def test_check_over_tolerance_exits_1(capsys, spec_file, monkeypatch):
    # This tests the CLI's exit status, not numerics: the checker is replaced by one that reports
    # an error over tolerance, so no kernel runs.
    monkeypatch.setattr(testing, "check", lambda kernel, **kw: {
        "rel_error": 0.5, "lse_max_abs_error": 0.25, "tolerance": 1e-4, "ok": False})
    rc, out, _ = run(capsys, "check", spec_file)
    assert rc == 1
    assert "relative error 5.000e-01 > tolerance 1e-04" in out and "FAILED" in out


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "float64"], "invalid choice: 'float64'"),
    (["--M", "many"], "invalid int value: 'many'"),
    (["--D", "0"], "--D must be at least 1, got 0"),
])
def test_check_bad_arguments_exit_2(capsys, spec_file, argv, message):
    rc, out, err = run(capsys, "check", spec_file, *argv)
    assert rc == 2 and out == "" and message in err


# --- cache --------------------------------------------------------------------------------------

def test_cache_info_and_clear(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    rc, out, _ = run(capsys, "cache", "info")
    assert rc == 0
    assert out.splitlines() == [f"path:    {tmp_path}", "kernels: 0", "configs: 0", "bytes:   0"]

    assert run(capsys, "compile", SOFTCAP)[0] == 0
    rc, out, _ = run(capsys, "cache", "info")
    lines = out.splitlines()
    assert rc == 0 and lines[1] == "kernels: 1"
    assert int(lines[3].split()[1]) > 0

    rc, out, _ = run(capsys, "cache", "clear")
    assert (rc, out) == (0, f"removed 2 files from {tmp_path}\n")  # the source and its names
    assert run(capsys, "cache", "info")[1].splitlines()[1:] == ["kernels: 0", "configs: 0",
                                                                "bytes:   0"]
    assert run(capsys, "cache", "clear")[1] == f"removed 0 files from {tmp_path}\n"


def test_cache_bad_action_exits_2(capsys):
    rc, _, err = run(capsys, "cache", "purge")
    assert rc == 2 and "invalid choice" in err


# --- argument handling and entry points ---------------------------------------------------------

def test_no_command_exits_2(capsys):
    rc, out, err = run(capsys)
    assert rc == 2 and "usage: attnc" in err


def test_help_and_version_exit_0(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "show" in out and "check" in out
    rc, out, _ = run(capsys, "--version")
    assert (rc, out) == (0, f"attnc {attnc.__version__}\n")


def test_python_dash_m(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnc", "passes"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("attnc", run_name="__main__")
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("parse -> cascade -> ")


def _entry_point() -> str:
    script = Path(sys.executable).with_name("attnc")
    found = str(script) if script.is_file() else shutil.which("attnc")
    if found is None:
        pytest.skip("the `attnc` entry point is not installed (pip install -e .)")
    return found


def test_installed_entry_point():
    proc = subprocess.run([_entry_point(), "passes"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == " -> ".join(pipeline.STAGES)
    assert [line.split()[1] for line in proc.stdout.splitlines()[1:1 + len(pipeline.PASSES)]] \
        == [p.name for p in pipeline.PASSES]


def test_bench_tunes_prints_the_choice_and_times_it(capsys, spec_file):
    rc, out, err = run(capsys, "bench", spec_file, "--B", "1", "--H", "2", "--Hkv", "1",
                       "--N", "20", "--D", "16")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "win: float32 on cpu (interpreter)"
    for kind in ("forward-m32", "backward-m32"):
        head = next(ln for ln in lines if ln.startswith(kind + ":"))
        assert "(tuned at shape [1, 2, 20, 16, 1, 20, 16] over 4 candidates)" in head
    assert sum("<- chosen" in ln for ln in lines) == 2
    assert sum("(default)" in ln for ln in lines) == 2
    assert any(ln.startswith("forward: ") and ln.endswith(" ms") for ln in lines)
    assert any(ln.startswith("forward + backward: ") for ln in lines)


def test_bench_a_linear_spec_forward_only(capsys):
    rc, out, err = run(capsys, "bench", "simple_gla", "--N", "20", "--D", "16", "--no-backward")
    assert rc == 0, err
    assert "chunked-bt32: BV=16" in out and "forward (chunked): " in out
    assert "forward + backward" not in out


def test_bench_rejects_bad_sizes(capsys):
    rc, _, err = run(capsys, "bench", "causal", "--N", "0")
    assert rc == 2 and "--N must be at least 1" in err


# --- inspect ------------------------------------------------------------------------------------

def test_inspect_prints_a_table_of_the_kernels(capsys):
    """causal's forward at head dim 64, compiled for sm_90 (as tests/test_inspect.py compiles
    it: Triton's cache has it then): one table row."""
    rc, out, err = run(capsys, "inspect", "causal", "--kernels", "forward", "--D", "64",
                       "--N", "1024")
    assert rc == 0, err
    head, rule, *rows = [line for line in out.splitlines() if line.startswith("|")]
    assert head.split("|")[1:4] == [" kernel ", " config ", " regs "]
    assert [r.split("|")[1].strip() for r in rows] == ["forward"]
    assert "wgmma bf16" in rows[0] and out.startswith("sm_90, Triton ")


@pytest.mark.parametrize("argv, message", [
    ([], "inspect takes a SPEC or --library"),
    (["causal", "--library"], "inspect takes a SPEC or --library"),
    (["causal", "--arch", "gfx942"], "--arch must look like sm_90"),
    (["causal", "--D", "0"], "--D must be at least 1"),
    (["nonexistent_spec_name"], "no spec file or library variant"),
])
def test_inspect_bad_arguments_exit_2(capsys, argv, message):
    rc, out, err = run(capsys, "inspect", *argv)
    assert rc == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3 and out == ""


def test_inspect_without_tritons_tools_says_so(capsys, monkeypatch):
    from attnc import inspect

    def missing(*args, **kw):
        raise inspect.ToolsMissing("Triton's bundled NVIDIA tools are missing: /x/cuobjdump")
    monkeypatch.setattr(inspect, "compile_jobs", missing)
    rc, out, err = run(capsys, "inspect", "causal", "--kernels", "forward")
    assert rc == 3 and out == ""
    assert err.strip().splitlines() == [
        "attnc: error: Triton's bundled NVIDIA tools are missing: /x/cuobjdump"]
