"""The sm_90 compile report: every kernel configuration the launchers can choose, compiled for Hopper
(H100/H200) by Triton's own compiler and the ptxas it ships, on any machine, no GPU needed.

    python -m mintune.bench compile [--json FILE]

Each launcher plans its launches on `meta` tensors (shapes, strides and dtypes without memory), so
the report compiles exactly what a launch at those shapes would: the same kernel, constexprs, warps,
stages, and the same argument specialisation (Triton's own, e.g. which integers are multiples of 16).
From the cubin it reads:

    registers      per thread (ptxas -v, from Triton's own ptxas run)
    spill_bytes    bytes of register spill stores + loads per thread (ptxas -v)
    shared_bytes   shared memory per program (Triton's allocation + static)
    mma            the matrix instruction in the SASS: wgmma (HGMMA), mma.sync (HMMA) or FMA
    a_operand      where the wgmma's A operand comes from: registers or shared memory
    loads          how tiles reach shared memory: TMA (UTMALDG), cp.async (LDGSTS) or plain loads
    ctas_per_sm    how many programs fit on one SM by registers and shared memory

and checks the limits every configuration must hold on Hopper: no spills, at most 227 KiB of shared
memory per program (228 KiB per SM, 1 KiB reserved), and wgmma wherever the kernel module says the
configuration must use it (16-bit attention; 16-bit int8 matmuls with M > 16). A report is a reading
of the compiler's output: it predicts, it does not measure (see docs/kernels.md).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

KERNEL_MODULES = ("int8_matmul", "flash_attention")
SHARED_LIMIT = 227 * 1024          # bytes of shared memory one program may use on sm_90
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024


def _triton_parts():
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    return triton, knobs, GPUTarget, CUDABackend, ASTSource, native_specialize_impl


def compile_launch(launch, arch: int = 90):
    """Compile one planned launch for sm_<arch> the way its launch would; returns (Triton's CompiledKernel,
    the log of Triton's own ptxas run)."""
    triton, knobs, GPUTarget, CUDABackend, ASTSource, specialize = _triton_parts()
    fn = launch.kernel
    signature, constexprs, attrs = {}, {}, {}
    given = iter(launch.args)
    for i, param in enumerate(fn.params):
        if param.name in launch.meta:
            signature[param.name] = "constexpr"
            constexprs[param.name] = launch.meta[param.name]
            continue
        arg = next(given)
        kind, spec = specialize(CUDABackend, arg, False, not param.do_not_specialize,
                                not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":          # None, or an integer 1
            constexprs[param.name] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    options = {k: launch.meta[k] for k in ("num_warps", "num_stages") if k in launch.meta}
    # compile afresh (not from Triton's cache) and have Triton print its ptxas -v log, to read spills
    saved = {k: os.environ.get(k) for k in ("TRITON_ALWAYS_COMPILE", "TRITON_DUMP_PTXAS_LOG")}
    os.environ.update(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1")
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=options)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return compiled, log.getvalue()


def read_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not frame:
        raise RuntimeError(f"no resource usage in Triton's ptxas log:\n{log[-2000:]}")
    return {"registers": int(regs.group(1)), "stack_bytes": int(frame.group(1)),
            "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)),
            "spill_bytes": int(frame.group(2)) + int(frame.group(3))}


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def read_cubin(cubin: bytes) -> dict:
    """Resource usage and instruction mix of one cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
    res = dict(re.findall(r"(SHARED):(\d+)", usage))
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass))
    hgmma = [line for line in sass.splitlines() if "HGMMA" in line]
    if hgmma:
        mma = "wgmma"
    elif ops["HMMA"]:
        mma = "mma.sync"
    elif ops["FFMA"] > 64:
        mma = "FMA"
    else:
        mma = "none"
    a_regs = any(re.search(r"HGMMA\.\S+\s+R\d+,\s*R\d+,", line) for line in hgmma)
    loads = "TMA" if ops["UTMALDG"] else "cp.async" if ops["LDGSTS"] else "ld.global"
    return {"static_shared": int(res.get("SHARED", 0)),
            "mma": mma, "a_operand": ("registers" if a_regs else "shared") if hgmma else None, "loads": loads,
            "sass": {k: ops[k] for k in ("HGMMA", "HMMA", "FFMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDS", "STS",
                                         "LDSM", "LDL", "STL", "BAR", "MUFU", "I2F", "F2F") if ops[k]}}


def _launches(name: str, alternative=None) -> list:
    """A kernel module's report launches; with alternative = (table, key, j), only the launches that
    change when its j-th ALTERNATIVES configuration replaces table[key]."""
    from mintune.kernels import swap_config

    module = importlib.import_module(f"mintune.kernels.{name}")
    plain = module.report_launches()
    if alternative is None:
        return plain
    table, key, j = alternative
    restore = swap_config(module, table, key, module.ALTERNATIVES[(table, key)][j])
    try:
        swapped = module.report_launches()
    finally:
        restore()
    known = {(label, launch.config) for label, launch, _ in plain}
    return [(f"{label} (alternative)", launch, dict(facts, alternative=True))
            for label, launch, facts in swapped if (label, launch.config) not in known]


def _entries(modules, alternatives: bool) -> list[tuple]:
    out = []
    for name in modules:
        module = importlib.import_module(f"mintune.kernels.{name}")
        alts = [None] + ([(t, k, j) for (t, k), cfgs in getattr(module, "ALTERNATIVES", {}).items()
                          for j in range(len(cfgs))] if alternatives else [])
        for alt in alts:
            out += [(name, alt, i) for i in range(len(_launches(name, alt)))]
    return out


def _compile_entry(entry: tuple) -> dict:
    """Compile one configuration of a kernel module and read its cubin (runs in a worker process)."""
    import triton

    name, alt, i = entry
    label, launch, facts = _launches(name, alt)[i]
    compiled, ptxas_log = compile_launch(launch)
    row = {"kernel": label, "config": launch.config, "function": launch.kernel.__name__,
           "num_warps": launch.meta.get("num_warps"), "num_stages": launch.meta.get("num_stages"),
           **facts, **read_ptxas_log(ptxas_log), **read_cubin(compiled.asm["cubin"])}
    row["shared_bytes"] = compiled.metadata.shared + row["static_shared"]
    threads = 32 * row["num_warps"]
    by_regs = REGISTERS_PER_SM // (max(row["registers"], 1) * threads)
    by_smem = SHARED_PER_SM // (row["shared_bytes"] + 1024) if row["shared_bytes"] else 32
    row["ctas_per_sm"] = min(by_regs, by_smem, 32)
    row["target"] = "sm_90a"
    row["triton"] = triton.__version__
    return row


def report(modules=KERNEL_MODULES, jobs: int | None = None, alternatives: bool = False, log=print) -> list[dict]:
    """One row per (kernel, configuration) the launchers can choose (and, with alternatives, per
    configuration the kernel files list as ALTERNATIVES), compiled by `jobs` processes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile report needs the real compiler: unset TRITON_INTERPRET")
    entries = _entries(modules, alternatives)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(entries)))
    if jobs == 1:
        results = map(_compile_entry, entries)
    else:  # a fresh interpreter per worker (spawn): no state shared with this process's Triton
        import concurrent.futures
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_compile_entry, entries)
    rows = []
    for row in results:
        rows.append(row)
        log(_line(row))
    if jobs > 1:
        pool.shutdown()
    return rows


def problems(rows: list[dict]) -> list[str]:
    """The limits every configuration must hold on Hopper; empty when all hold."""
    out = []
    for r in rows:
        if r.get("alternative"):  # informative: only what the launchers choose must hold the limits
            continue
        where = f"{r['kernel']} [{r['config']}]"
        if r["spill_bytes"]:
            out.append(f"{where}: {r['spill_bytes']} bytes of register spill per thread")
        if r["shared_bytes"] > SHARED_LIMIT:
            out.append(f"{where}: {r['shared_bytes']} bytes of shared memory (limit {SHARED_LIMIT})")
        if r.get("needs_wgmma") and r["mma"] != "wgmma":
            out.append(f"{where}: uses {r['mma']}, expected wgmma")
    return out


HEADER = f"{'kernel':44s} {'config':42s} {'regs':>4s} {'spill':>5s} {'smem KiB':>8s} {'mma':8s} {'A from':9s} " \
         f"{'loads':9s} {'CTA/SM':>6s}"


def _line(r: dict) -> str:
    return (f"{r['kernel'][:44]:44s} {r['config'][:42]:42s} {r['registers']:4d} {r['spill_bytes']:5d} "
            f"{r['shared_bytes'] / 1024:8.1f} {r['mma']:8s} {r['a_operand'] or '-':9s} {r['loads']:9s} "
            f"{r['ctas_per_sm']:6d}")


def run(json_path: str | None = None, jobs: int | None = None, alternatives: bool = False) -> int:
    """`python -m mintune.bench compile`: print the table, check the limits; exit status 1 if one fails."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels were (or would be) built for the interpreter
        print("TRITON_INTERPRET=1 is set; compiling in a child process without it")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "mintune.bench", "compile"] + (["--json", json_path] if json_path else []) \
            + (["--jobs", str(jobs)] if jobs else []) + (["--alternatives"] if alternatives else [])
        return subprocess.run(cmd, env=env).returncode
    import triton

    print(f"sm_90 compile report: triton {triton.__version__}, ptxas {_ptxas_version()}")
    print(HEADER)
    rows = report(jobs=jobs, alternatives=alternatives)
    bad = problems(rows)
    for line in bad:
        print("LIMIT:", line)
    print(f"{len(rows)} configurations, {len(bad)} over a limit")
    if json_path:
        from .files import write_json

        write_json(json_path, {"triton": triton.__version__, "ptxas": _ptxas_version(), "rows": rows,
                               "problems": bad})
    return 1 if bad else 0


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else "unknown"
