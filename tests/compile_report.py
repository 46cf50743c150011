"""Compiles every Triton kernel of selpo for NVIDIA GPUs with no GPU present, and reports what it built.

selpo's GEMMs run in cuBLAS; its Triton kernels are the memory-bound passes. For each kernel and target
(sm_80, sm_90): shared memory, registers and stack bytes (spills live there, from cuobjdump), whether its
global loads are 16-byte vectors (``ld.global...v4``) and how many of its programs fit on one SM at once
(by registers and shared memory). For the loops that stream a logits tile, instructions per element: the SASS
instructions of the loop's body (from a backward branch's target to the branch) over the elements one thread
folds per trip. Too many make a pass issue-bound: an H200 streams 2.4 T bf16 elements per second (4.8 TB/s)
and issues at most 33 T thread instructions (132 SMs x 128 lanes x 1.98 GHz), 14 per element with no stall.
Run as a script without TRITON_INTERPRET (tests/test_compile.py does); prints JSON, or a markdown table with
--markdown.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from selpo.kernels.logits_logprobs import triton_kernels as logits_lp
from selpo.kernels.segment_sum import triton_kernels as segment
from selpo.kernels.streaming import passes_triton as passes
from selpo.kernels.topk_mask import triton_kernels as topk

TARGETS = [("sm_80", GPUTarget("cuda", 80, 32)), ("sm_90", GPUTarget("cuda", 90, 32))]
# Registers and shared memory of one SM (the same on A100 and H100), and its most resident blocks.
SM_REGISTERS = 65536
SM_SHARED = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SM_BLOCKS = 32


# Elements one thread folds per trip of the loop, for the kernels whose instructions per element are counted.
LOOP_ELEMENTS = {passes._merge_lse_kernel: passes.BLOCK_V // (32 * passes.NUM_WARPS)}


def kernel_specs():
    """(name, jit function, signature, constexprs, compile options, streams a logits tile)."""
    specs = []
    flags = dict(HAS_BIAS=True, HAS_SOFTCAP=True)
    warps = {"num_warps": passes.NUM_WARPS}
    for dtype in ("bf16", "fp16", "fp32"):
        vec = 16 // {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]
        plain = dict(HAS_BIAS=False, HAS_SOFTCAP=False, SPLIT=False)
        for extras, options in (("", plain), ("+split", {**plain, "SPLIT": True}),
                                ("+bias+softcap", {**flags, "SPLIT": False})):
            specs.append((f"streaming.merge_lse[{dtype}{extras}]", passes._merge_lse_kernel,
                          {"x_ptr": f"*{dtype}", "ld": "i32", "W": "i32", "span": "i32", "b_ptr": f"*{dtype}",
                           "m_ptr": "*fp32", "s_ptr": "*fp32", "temperature": "fp32", "softcap": "fp32"},
                          {**options, "BLOCK_V": passes.BLOCK_V, "VEC": vec}, warps, True))
        specs.append((f"streaming.grad_logits[{dtype}]", passes._grad_logits_kernel,
                      {"x_ptr": f"*{dtype}", "ld": "i32", "W": "i32", "v0": "i32", "b_ptr": f"*{dtype}",
                       "tgt_ptr": "*i64", "g_ptr": "*fp32", "lse_ptr": "*fp32", "temperature": "fp32",
                       "softcap": "fp32"}, {**flags, "BLOCK_V": passes.BLOCK_V}, warps, True))
        specs.append((f"streaming.target_logits[{dtype}]", passes._target_logits_kernel,
                      {"h_ptr": f"*{dtype}", "rows_ptr": "*i64", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}",
                       "tgt_ptr": "*i64", "out_ptr": "*fp32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
                       "temperature": "fp32", "softcap": "fp32"}, {**flags, "BLOCK_D": passes.BLOCK_D}, warps,
                      True))
    specs.append(("streaming.merge_parts", passes._merge_parts_kernel,
                  {"parts_ptr": "*fp32", "m_ptr": "*fp32", "s_ptr": "*fp32", "R": "i32", "P": "i32"},
                  {"BLOCK_R": passes.PARTS_ROWS, "BLOCK_P": 16}, {"num_warps": 4}, False))
    cfg = logits_lp.launch_config(151936)
    for dtype in ("fp32", "bf16"):
        common = {"tgt_ptr": "*i64", "lse_ptr": "*fp32", "V": "i32", "ignore_index": "i32", "temperature": "fp32"}
        specs.append((f"logits_logprobs.forward[{dtype}]", logits_lp._forward_kernel,
                      {"x_ptr": f"*{dtype}", "logp_ptr": "*fp32", **common}, {"BLOCK_V": cfg["BLOCK_V"]},
                      {"num_warps": cfg["num_warps"]}, False))
        specs.append((f"logits_logprobs.backward[{dtype}]", logits_lp._backward_kernel,
                      {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "g_ptr": "*fp32", **common},
                      {"BLOCK_V": cfg["BLOCK_V"]}, {"num_warps": cfg["num_warps"]}, False))
    warps = {"num_warps": segment.NUM_WARPS}
    specs.append(("segment_sum.sum", segment._sum_kernel, {"v_ptr": "*fp32", "cu_ptr": "*i32", "out_ptr": "*fp32"},
                  {"BLOCK": segment.BLOCK}, warps, False))
    specs.append(("segment_sum.broadcast", segment._broadcast_kernel,
                  {"g_ptr": "*fp32", "cu_ptr": "*i32", "out_ptr": "*fp32"}, {"BLOCK": segment.BLOCK}, warps, False))
    for dtype in ("fp32", "bf16"):
        specs.append((f"topk_mask[{dtype}]", topk._topk_mask_kernel,
                      {"scores_ptr": f"*{dtype}", "valid_ptr": "*u8", "cu_ptr": "*i32", "k_ptr": "*i32",
                       "largest_ptr": "*u8", "out_ptr": "*i8"},
                      {"COMPARE": tl.float32, "BLOCK_I": topk.BLOCK_I, "BLOCK_J": topk.BLOCK_J}, {"num_warps": 4},
                      False))
    return specs


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled cuobjdump prints for the cubin with ``flag``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


def loop_instructions(sass: str) -> int:
    """SASS instructions of the longest loop: from a backward branch's target to the branch, both counted."""
    code = [(int(addr, 16), text) for addr, text in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass, re.M)]
    loops = [(int(target, 16), at) for at, text in code
             for target in re.findall(r"\bBRA (0x[0-9a-f]+)", text) if int(target, 16) < at]
    if not loops:
        raise ValueError("no loop in the SASS")
    return max(sum(lo <= at <= hi for at, _ in code) for lo, hi in loops)


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spills live there) as read by cuobjdump."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)), "local_bytes": int(usage.group(3))}


# Integer arguments that are multiples of 16 for the inputs the kernels see in practice (hidden sizes, row
# strides and slice widths of the logits buffer, whose slices are multiples of 128 columns but the last). With
# no GPU, nothing tells the compiler what the JIT learns from real arguments (16-byte-aligned pointers, these
# multiples of 16); without the hints it cannot prove alignment, and it would report narrow loads that the
# kernels that run do not make.
ALIGNED_INTS = {"D", "stride_h", "stride_w", "ld", "W", "span"}


def alignment_hints(signature: dict) -> dict:
    """Triton's ``tt.divisibility`` attributes for the pointers and ALIGNED_INTS of a kernel signature."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or name in ALIGNED_INTS}


def programs_per_sm(arch: str, registers: int, shared: int, warps: int) -> int:
    """Programs of a kernel resident on one SM at once, as its registers and shared memory allow."""
    by_registers = SM_REGISTERS // max(1, registers * 32 * warps)
    by_shared = SM_SHARED[arch] // shared if shared else SM_BLOCKS
    return min(by_registers, by_shared, SM_BLOCKS)


def report():
    rows = []
    for name, fn, sig, consts, options, streams in kernel_specs():
        for arch, target in TARGETS:
            source = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=alignment_hints(sig))
            compiled = triton.compile(source, target=target, options=options)
            ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
            usage = resource_usage(cubin)
            per_element = (loop_instructions(cuobjdump(cubin, "-sass")) / LOOP_ELEMENTS[fn] if fn in LOOP_ELEMENTS
                           else None)
            rows.append({"kernel": name, "arch": arch, "shared_bytes": compiled.metadata.shared,
                         "vector_loads": bool(re.search(r"ld\.global(\.\w+)*\.v4\.", ptx)),
                         "programs_per_sm": programs_per_sm(arch, usage["registers"], compiled.metadata.shared,
                                                            options["num_warps"]),
                         "instructions_per_element": per_element, "streams_logits": streams, **usage, **options})
    return rows


def markdown(rows):
    lines = ["| kernel | arch | warps | shared (B) | registers | stack (B) | 16-byte loads | programs / SM "
             "| instructions / element |", "|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for r in rows:
        per_element = "" if r["instructions_per_element"] is None else f"{r['instructions_per_element']:.1f}"
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['shared_bytes']} | {r['registers']} "
                     f"| {r['stack_bytes']} | {yes[r['vector_loads']]} | {r['programs_per_sm']} | {per_element} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = report()
    print(markdown(rows) if "--markdown" in sys.argv else json.dumps(rows))
