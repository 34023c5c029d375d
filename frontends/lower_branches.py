"""Lower an `attention` block holding `branch` statements to a Branches (attnc/ir/branches.py).

    attention local_plus_compressed {
      option window = 64, stride = 16
      operand kc[n], vc[n]
      branch local { mask = n <= m and m - n < window }
      branch compressed { k = kc  v = vc  mask = (n + 1) * stride - 1 <= m }
      combine = softmax            # or `gates`, with a `gate = ...` in each branch
    }

Each branch becomes one AttentionSpec, lowered by the ordinary `_Lowerer.attention` on a
synthetic block: the block's declarations the branch mentions, its shared statements, and the
branch's own statements, which replace the shared ones they override (a `score`, `mask`, ...
replaces the shared one; assignments to an operand replace the shared ones to it; a `let`
replaces the shared let of its name). Inside a branch a bare-name assignment `k = kc` / `v = vc`
renames the branch's keys / values to a key-side operand: that operand is the branch's k (its n
and N are the operand's rows), so its declaration leaves the branch. `v = k`, and `v = c` of an
operand the branch also dots (MLA's latent), stay value aliases (frontends/lower_around.py).
A branch's `gate` (combine = gates) stays in its spec (`around.gate`): its kernel multiplies
its output by it (and may skip the query tiles whose gates are all 0).

Declarations: a branch is lowered with only the declarations (and options) its statements
mention, so one that only another branch reads is no "declared but never used" there; each must
be read by some branch, checked here at the declaration. Refused at their line, with a
hint: one branch only, `combine` missing, repeated, unknown or inside a branch, a gate missing
(gates) or present (softmax), a gate outside the branches, a rename to a query-side
operand or to no operand, a branch named twice, a declaration or a branch inside a branch, and a
branch that does not normalize with a plain softmax.
"""

from __future__ import annotations

import copy

import lark
from attnc.frontends.lower import _Lowerer, _origin, _position, _Scope
from attnc.ir.branches import Branch, Branches, Combine, verify_branches
from attnc.ir.cascade import Normalizer

DECLARATIONS = ("option", "param", "input", "operand")
# statements given at most once per block: a branch's replaces the shared one
KEYED = ("score", "mask", "normalize", "weight", "sink", "kv_head", "premix", "postmix")
COMBINES = tuple(c.value for c in Combine)


def lower_branches(lw: _Lowerer, blk: lark.Tree) -> Branches:
    name_tok, *stmts = blk.children
    name = str(name_tok)
    decls, shared, branches, combines = [], [], [], []
    for st in stmts:
        kind = st.data
        if kind in DECLARATIONS:
            decls.append(st)
        elif kind == "branch":
            branches.append(st)
        elif kind == "combine":
            combines.append(st)
        elif kind == "gate":
            raise lw.error(st, "a gate outside the branches",
                           hint="with combine = gates, give each branch its own gate")
        else:
            shared.append(st)
    combine = _combine(lw, blk, combines)
    if len(branches) < 2:
        raise lw.error(branches[0] if branches else blk,
                       f"a block of branches needs two or more, this one has {len(branches)}",
                       hint="write the statements of a single branch at the block's top level")
    seen: dict[str, lark.Token] = {}
    for br in branches:
        tok = br.children[0]
        assert isinstance(tok, lark.Token)
        if str(tok) in seen:
            raise lw.error(tok, f"branch {tok} is defined twice",
                           hint=f"first defined on line {seen[str(tok)].line}; name each branch "
                                "apart")
        seen[str(tok)] = tok
    # the whole block's declarations: checks them and the caller's options once
    scope = _Scope()
    lw._declarations([st for st in decls if st.data != "operand"], scope)
    operands = _operands(lw, decls, scope)
    declared: dict[str, lark.Token] = {**scope.declared, **{n: t for n, (t, _) in operands.items()}}
    used: set[str] = set()
    lowered = []
    for br in branches:
        branch, mentions = _branch(lw, name, br, decls, shared, operands, scope, combine)
        used |= mentions
        lowered.append(branch)
    for st in shared:
        if st.data == "let" and str(st.children[0]) not in used:
            raise lw.error(st.children[0], f"let {st.children[0]} is declared but never used",
                           hint="remove it, or read it in a branch")
    for decl_name, tok in declared.items():
        if decl_name not in used:
            what = ("option" if decl_name in scope.options else "operand"
                    if decl_name in operands else scope.tensors[decl_name].kind.value)
            raise lw.error(tok, f"{what} {decl_name} is declared but never used",
                           hint="remove it, or read it in a branch (or rename a branch's k or v "
                                "to it)")
    origins = (_origin("", blk),) + tuple(_origin(f"branch {b.children[0]}", b)
                                          for b in branches)
    if combines:
        origins += (_origin("combine", combines[0]),)
    ir = Branches(name=name, branches=tuple(lowered), combine=combine,
                  options=tuple(scope.options.items()), origins=origins)
    verify_branches(ir)
    return ir


def _combine(lw: _Lowerer, blk: lark.Tree, combines: list[lark.Tree]) -> Combine:
    if not combines:
        raise lw.error(blk, "a block of branches needs `combine = softmax` or `combine = gates`",
                       hint="softmax: one softmax over every branch's keys; gates: each branch "
                            "normalized apart, weighed by its gate")
    if len(combines) > 1:
        raise lw.error(combines[1], "'combine' is given twice",
                       hint=f"first given on line {_position(combines[0])[0]}")
    tok = combines[0].children[0]
    if str(tok) not in COMBINES:
        raise lw.error(tok, f"combine '{tok}' is not supported",
                       hint="supported: " + ", ".join(COMBINES))
    return Combine(str(tok))


def _operands(lw: _Lowerer, decls: list[lark.Tree], scope: _Scope
              ) -> dict[str, tuple[lark.Token, str]]:
    """Each declared operand's name token and side ("m": query side, "n": key side)."""
    out: dict[str, tuple[lark.Token, str]] = {}
    for st in decls:
        if st.data != "operand":
            continue
        for td in st.children:
            tok, *dims = td.children
            assert isinstance(tok, lark.Token)
            side = (str(dims[0].children[0]) if len(dims) == 1 and isinstance(dims[0], lark.Tree)
                    and dims[0].data == "name" else "")
            if side not in ("m", "n"):
                raise lw.error(td, f"operand {tok} is indexed by m (query side) or n (key side)",
                               hint=f"write operand {tok}[m] or {tok}[n]")
            if str(tok) in out or str(tok) in scope.tensors or str(tok) in scope.options or \
                    str(tok) in lw.reserved:
                raise lw.error(tok, f"operand name '{tok}' is reserved or already declared")
            out[str(tok)] = (tok, side)
    return out


def _branch(lw: _Lowerer, block: str, br: lark.Tree, decls: list[lark.Tree],
            shared: list[lark.Tree], operands: dict[str, tuple[lark.Token, str]],
            scope: _Scope, combine: Combine) -> tuple[Branch, set[str]]:
    """One branch's Branch, and the declared names it reads."""
    tok, *own = br.children
    assert isinstance(tok, lark.Token)
    renames: dict[str, tuple[str, lark.Tree]] = {}  # k / v -> (operand, statement)
    gate_st = None
    body = []
    for st in own:
        kind = st.data
        if kind in DECLARATIONS:
            raise lw.error(st, f"a {kind} inside a branch",
                           hint="declare it at the top of the block: declarations are shared "
                                "by every branch")
        if kind in ("branch", "combine"):
            raise lw.error(st, f"a {kind} inside a branch",
                           hint="branches do not nest; combine is given once, at the block's "
                                "top level")
        if kind == "gate":
            if gate_st is not None:
                raise lw.error(st, "'gate' is given twice",
                               hint=f"first given on line {_position(gate_st)[0]}")
            gate_st = st
            body.append(st)
        elif _rename(lw, st, operands, renames):
            continue
        else:
            body.append(st)
    if combine is Combine.GATES and gate_st is None:
        raise lw.error(tok, f"branch {tok} has no gate; combine = gates weighs each branch's "
                            "output by its gate", hint="add `gate = <expression of b, h, m>`, "
                                                       "e.g. gate = sigmoid(w[h])")
    if combine is Combine.JOINT and gate_st is not None:
        raise lw.error(gate_st, "a gate with combine = softmax",
                       hint="one softmax over every branch's keys has no per-branch weight; "
                            "write combine = gates to mix separately normalized branches")
    stmts, mentioned = _read(_merged(shared, body))
    if "v" in renames and renames["v"][0] in mentioned:
        # `v = c` of an operand the branch also dots (MLA's latent): the value alias, no rename
        body.append(renames.pop("v")[1])
        stmts, mentioned = _read(_merged(shared, body))
    for role, (arg, _) in renames.items():
        if arg in mentioned:
            at = next(t for st in stmts for t in _names(st) if str(t) == arg)
            raise lw.error(at, f"{arg} is this branch's {'keys' if role == 'k' else 'values'} "
                               f"({role} = {arg})", hint=f"write {role} here")
    renamed = {role: arg for role, (arg, _) in renames.items()}
    kept = _kept_declarations(decls, mentioned, set(renamed.values()))
    options = {str(od.children[0]) for st in kept if st.data == "option" for od in st.children}
    branch_lw = copy.copy(lw)
    branch_lw.overrides = {k: v for k, v in lw.overrides.items() if k in options}
    name_tok = lark.Token.new_borrow_pos("NAME", f"{block}_{tok}", tok)
    spec = branch_lw.attention(lark.Tree("attention", [name_tok, *kept, *stmts], br.meta))
    _check_softmax(lw, tok, spec, stmts)
    uses = (mentioned | set(renamed.values())) & (set(scope.declared) | set(operands))
    return Branch(str(tok), spec, renamed.get("k", "k"), renamed.get("v", "v")), uses


def _rename(lw: _Lowerer, st: lark.Tree, operands: dict[str, tuple[lark.Token, str]],
            renames: dict[str, tuple[str, lark.Tree]]) -> bool:
    """Record `k = kc` / `v = vc` (a bare key-side operand name) in `renames`; False for any
    other statement (`v = k`, the value alias, among them)."""
    if st.data != "assign":
        return False
    target, value = st.children
    if str(target) not in ("k", "v") or not (isinstance(value, lark.Tree)
                                             and value.data == "name"):
        return False
    arg = str(value.children[0])
    if arg == "k" and str(target) == "v":
        return False
    if arg not in operands:
        raise lw.error(value, f"{target} = {arg}: {arg} is no key-side operand",
                       hint=f"declare it `operand {arg}[n]` at the top of the block; a "
                            f"branch's {target} = NAME renames its "
                            f"{'keys' if str(target) == 'k' else 'values'} to that operand")
    if operands[arg][1] == "m":
        raise lw.error(value, f"{target} = {arg}: {arg} is a query-side operand ({arg}[m])",
                       hint=f"keys and values have one row per key: declare it "
                            f"`operand {arg}[n]`")
    if str(target) in renames:
        raise lw.error(st, f"this branch's {target} is renamed twice")
    renames[str(target)] = (arg, st)
    return True


def _merged(shared: list[lark.Tree], own: list[lark.Tree]) -> list[lark.Tree]:
    """The branch's statements: the shared ones it does not override, then its own (lets
    first, so that shared statements may read a branch's let)."""
    def key(st: lark.Tree) -> str | None:
        if st.data in KEYED:
            return st.data
        if st.data in ("let", "assign"):
            return f"{st.data} {st.children[0]}"
        return None
    overridden = {key(st) for st in own} - {None}
    kept = [st for st in shared if key(st) not in overridden]
    lets = [st for st in kept + own if st.data == "let"]
    return lets + [st for st in kept + own if st.data != "let"]


def _names(node) -> list[lark.Token]:
    """The NAME tokens an expression or statement reads (a call's function name excluded)."""
    if isinstance(node, lark.Token):
        return [node] if node.type == "NAME" else []
    kids = node.children[1:] if node.data == "call" else node.children
    return [t for kid in kids for t in _names(kid)]


def _read(stmts: list[lark.Tree]) -> tuple[list[lark.Tree], set[str]]:
    """The statements less the lets nothing else reads (a shared let only another branch
    reads), and the names they read."""
    lets = {str(st.children[0]): st for st in stmts if st.data == "let"}
    seen = {str(t) for st in stmts if st.data != "let" for t in _names(st)}
    grew = True
    while grew:
        grew = False
        for let_name, st in lets.items():
            if let_name in seen:
                new = {str(t) for t in _names(st.children[1])} - seen
                if new:
                    seen |= new
                    grew = True
    return [st for st in stmts if st.data != "let" or str(st.children[0]) in seen], seen


def _kept_declarations(decls: list[lark.Tree], mentioned: set[str], renamed: set[str]
                       ) -> list[lark.Tree]:
    """The declaration statements cut down to what the branch reads: tensors it mentions (a
    renamed operand is its k or v, not a declaration), then the options those and the
    statements mention."""
    tensors = []
    for st in decls:
        if st.data == "option":
            continue
        tds = [td for td in st.children
               if str(td.children[0]) in mentioned and str(td.children[0]) not in renamed]
        if tds:
            tensors.append(lark.Tree(st.data, tds, st.meta))
    wanted = mentioned | {str(t) for st in tensors for td in st.children
                          for dim in td.children[1:] for t in _names(dim)}
    options = []
    for st in decls:
        if st.data == "option":
            defs = [od for od in st.children if str(od.children[0]) in wanted]
            if defs:
                options.append(lark.Tree("option", defs, st.meta))
    return options + tensors


def _check_softmax(lw: _Lowerer, tok: lark.Token, spec, stmts: list[lark.Tree]) -> None:
    by_kind = {st.data: st for st in stmts}
    if spec.normalize is not Normalizer.SOFTMAX:
        raise lw.error(by_kind.get("normalize", tok),
                       f"branch {tok} normalizes with {spec.normalize.value}; branches combine "
                       "softmax outputs", hint="remove the normalize statement (softmax)")
    for kind in ("weight", "sink"):
        if getattr(spec, kind) is not None:
            raise lw.error(by_kind.get(kind, tok), f"a {kind} in branch {tok} is not supported",
                           hint="branches combine plain softmax outputs (lse merge or gates)")

