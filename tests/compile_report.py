"""Compiles every Triton kernel of selpo for NVIDIA GPUs with no GPU present, and reports what it built.

For each kernel, target (sm_80, sm_90) and block sizes (every tile the matmul kernels are autotuned over):
shared memory, registers and stack bytes, where spills go (from cuobjdump), whether the PTX multiplies on tensor
cores (mma.sync on sm_80, wgmma on sm_90) and whether its loads are pipelined (cp.async). Run as a script without TRITON_INTERPRET (tests/test_compile.py does); prints JSON,
or a markdown table with --markdown.
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

from selpo.kernels.linear_logprobs import triton_kernels as linear
from selpo.kernels.logits_logprobs import triton_kernels as logits_lp
from selpo.kernels.segment_sum import triton_kernels as segment
from selpo.kernels.token_scores import triton_kernels as scores
from selpo.kernels.topk_mask import triton_kernels as topk

TARGETS = [("sm_80", GPUTarget("cuda", 80, 32)), ("sm_90", GPUTarget("cuda", 90, 32))]


def _head_args(dtype):
    return {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "b_ptr": f"*{dtype}"}


def _linear_consts(blocks, **flags):
    consts = dict(HAS_BIAS=False, HAS_SOFTCAP=False, IEEE=False, DOT_FP32=False, **flags)
    consts.update({k: v for k, v in blocks.items() if k.startswith("BLOCK")})
    return consts


def _options(blocks):
    return {k: v for k, v in blocks.items() if k.startswith("num_")}


def tile_name(tile):
    return "{BLOCK_N}x{BLOCK_V}x{BLOCK_D} w{num_warps} s{num_stages}".format(**tile)


def kernel_specs():
    """(name, jit function, signature, constexprs, compile options, uses tensor cores); the matmul kernels
    once per tile they are autotuned over."""
    specs = []
    for dtype, tile in ((dtype, tile) for dtype in ("bf16", "fp16") for tile in linear.TILES):
        fwd = {**_head_args(dtype), "tgt_ptr": "*i64", "rows_ptr": "*i64", "part_ptr": "*fp32",
               "n_rows": "i32", "V": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
               "temperature": "fp32", "softcap": "fp32", "span": "i32"}
        specs.append((f"linear_logprobs.forward[{dtype}] {tile_name(tile)}", linear._forward_kernel.fn, fwd,
                      _linear_consts(tile), _options(tile), True))
        bwd = {**_head_args(dtype), "tgt_ptr": "*i64", "rows_ptr": "*i64", "g_ptr": "*fp32", "lse_ptr": "*fp32",
               "dz_ptr": f"*{dtype}", "n_rows": "i32", "v_start": "i32", "v_end": "i32", "D": "i32", "stride_h": "i32",
               "stride_w": "i32", "temperature": "fp32", "softcap": "fp32"}
        specs.append((f"linear_logprobs.grad_logits[{dtype}] {tile_name(tile)}", linear._grad_logits_kernel.fn, bwd,
                      _linear_consts(tile), _options(tile), True))
        ts = {"ha_ptr": f"*{dtype}", "wa_ptr": f"*{dtype}", "hb_ptr": f"*{dtype}", "wb_ptr": f"*{dtype}",
              "tgt_ptr": "*i64", "rows_ptr": "*i64", "out_ptr": "*fp32", "n_rows": "i32", "V": "i32", "DA": "i32",
              "DB": "i32", "stride_ha": "i32", "stride_wa": "i32", "stride_hb": "i32", "stride_wb": "i32"}
        ts_consts = {k: v for k, v in _linear_consts(tile).items() if k not in ("HAS_BIAS", "HAS_SOFTCAP")}
        specs.append((f"token_scores[{dtype}] {tile_name(tile)}", scores._token_scores_kernel.fn, ts, ts_consts,
                      _options(tile), True))
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
                      {"COMPARE": tl.float32, "BLOCK_I": topk.BLOCK_I, "BLOCK_J": topk.BLOCK_J}, {"num_warps": 4}, False))
    return specs


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes (spills live there) as read by Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2)), "local_bytes": int(usage.group(3))}


# Integer arguments that are multiples of 16 for the inputs the kernels see in practice (hidden sizes, row
# strides, vocabulary spans). With no GPU, nothing tells the compiler what the JIT learns from real arguments
# (16-byte-aligned pointers, these multiples of 16); without the hints it cannot prove alignment, and it would
# report narrow loads that are never pipelined, unlike the kernels that run.
ALIGNED_INTS = {"D", "DA", "DB", "stride_h", "stride_w", "stride_ha", "stride_wa", "stride_hb", "stride_wb", "span"}


def alignment_hints(signature: dict) -> dict:
    """Triton's ``tt.divisibility`` attributes for the pointers and ALIGNED_INTS of a kernel signature."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
            if kind.startswith("*") or name in ALIGNED_INTS}


def report():
    rows = []
    for name, fn, sig, consts, options, tensor_cores in kernel_specs():
        for arch, target in TARGETS:
            source = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=alignment_hints(sig))
            compiled = triton.compile(source, target=target, options=options)
            ptx = compiled.asm["ptx"]
            rows.append({"kernel": name, "arch": arch, "shared_bytes": compiled.metadata.shared,
                         "mma": "mma.sync" in ptx, "wgmma": "wgmma.mma_async" in ptx, "async_copies": "cp.async" in ptx,
                         "expects_tensor_cores": tensor_cores, **resource_usage(compiled.asm["cubin"]), **options})
    return rows


def markdown(rows):
    lines = ["| kernel | arch | warps | shared (B) | registers | stack (B) | mma.sync | wgmma | cp.async |",
             "|---|---|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['num_warps']} | {r['shared_bytes']} | {r['registers']} "
                     f"| {r['stack_bytes']} | {yes[r['mma']]} | {yes[r['wgmma']]} | {yes[r['async_copies']]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = report()
    print(markdown(rows) if "--markdown" in sys.argv else json.dumps(rows))
