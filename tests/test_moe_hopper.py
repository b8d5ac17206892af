"""The Hopper GEMMs of the MoE and lora_linear (fastft.kernels.moe_hopper, lora_linear_hopper) build for sm_90
without a GPU: Triton's own ptxas compiles each variant the MoE block and lora_linear launch, so a Gluon API change or
a register / shared-memory overflow fails here, on CPU.
Its numerics are tested on the GPU against the fp32 reference (tests/test_moe.py, -m gpu).

The builds run in a child process without TRITON_INTERPRET: the CPU suite interprets Triton kernels, and after some
of those runs triton.language's jit helpers (gl.cdiv) no longer compile in this process."""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

moe_hopper = pytest.importorskip("fastft.kernels.moe_hopper")
if not moe_hopper.HAS_GLUON:
    pytest.skip("this triton has no Gluon", allow_module_level=True)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

BIN = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin"
SMEM_LIMIT = 232448  # sm_90: 227 KB of dynamic shared memory per block
POINTERS = {"A": "*bf16", "a_idx": "*i32", "W": "*u8", "WS": "*u8", "LUT": "*fp32", "bias": "*bf16", "L": "*fp32",
            "LBt": "*bf16",
            "C": "*bf16", "c_idx": "*i32", "AUX": "*bf16", "tile_expert": "*i32",
            "tile_row": "*i32", "offsets": "*i32"}
FLOATS = ("lora_scale", "limit", "alpha")
# Arguments not specialised as multiples of 16 at gpt-oss shape (e.g. the scale rows, in / 32 = 90 bytes).
ODD = ("num_tiles", "row_start", "R", "s_sr", "s_be") + FLOATS
# The four GEMMs of one MoE block, then lora_linear's (one expert, MXFP4 or NF4; its dropout dX adds onto C):
# (TRANS, EPI, GATHER_A, SCATTER_C, HAS_BIAS, NF4, ADD_C); the routing weight is moe._slot_sum's, after the GEMMs
VARIANTS = {
    "gate_up forward": (False, 1, True, False, True, False, False),
    "down forward": (False, 0, False, True, True, False, False),
    "down dX": (True, 0, True, False, False, False, False),
    "gate_up dX": (True, 0, False, True, False, False, False),
    "linear forward": (False, 0, False, False, True, False, False),
    "linear dX": (True, 0, False, False, False, False, True),
    "nf4 linear forward": (False, 0, False, False, True, True, False),
    "nf4 linear dX": (True, 0, False, False, False, True, True),
}


def build(variant, bm, lora, tiles):
    fn = moe_hopper._ws_gemm_kernel
    trans, epi, gather, scatter, has_bias, nf4, add_c = VARIANTS[variant]
    linear = "linear" in variant  # lora_linear's tables, loader and decoder (TMA activations, raw lead, bf16x2)
    table = (moe_hopper.NF4_META if nf4 else moe_hopper.LINEAR_META) if linear else moe_hopper.META
    meta = dict(table[bm, lora])
    num_warps = meta.pop("num_warps")
    # lora_linear's dX adds onto C only with dropout, whose LoRA term is then already in C
    const = dict(TRANS=trans, NF4=nf4, GS=64 if nf4 else 32, EPI=epi, GATHER_A=gather, TMA_A=linear,
                 LEAD=meta["RAW_STAGES"] - 2 if linear else 0, MUL_X2=linear, SCATTER_C=scatter,
                 HAS_BIAS=has_bias, ADD_C=add_c and not lora, R_PAD=16 if lora else 0,
                 LORA_MMA=lora and linear, TILES=tiles, BM=bm,
                 BK=moe_hopper.BK, GROUP=moe_hopper.GROUP_M, num_warps=num_warps, **meta)
    pointers = dict(POINTERS, WS="*fp32") if nf4 else POINTERS
    # activation rows not gathered come through TMA (the launcher's choice for 16-byte aligned rows)
    pointers = dict(pointers, a_desc="*bf16" if not linear else (
        f"tensordesc<bf16[{bm}, {moe_hopper.BK}],NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, "
        "rank=2, transposed=False, fp4_padded=False, cga_layout=[])>"))
    sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    attrs = {(i, ): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in ODD}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))


def main_loop_spills(cubin: bytes) -> int:
    """Local-memory ops between the MMA partition's first wgmma and its loop's back branch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
    first = next(i for i, ln in enumerate(sass) if "HGMMA" in ln)
    last = max(i for i, ln in enumerate(sass) if "HGMMA" in ln)
    end = next(i for i in range(last, len(sass)) if re.search(r"\bBRA\b", sass[i]))
    return sum(bool(re.search(r"\b(LDL|STL)\b", ln)) for ln in sass[first:end + 1])


# (BM, LoRA, TILES): BM=128 tables launch ALL_TILES; 256-row tables LONG_TILES at BM=256 and SHORT_TAILS at BM=128
CASES = [(variant, bm, lora, tiles) for variant in VARIANTS
         for bm, lora, tiles in [(128, True, moe_hopper.ALL_TILES), (128, True, moe_hopper.SHORT_TAILS),
                                 (256, True, moe_hopper.LONG_TILES), (256, False, moe_hopper.LONG_TILES)]]


# lora_linear_hopper's register-operand kernel serves the same eight (the MoE's as GROUPED, LoRA in bf16x3):
# (TRANS, EPI, SCATTER, HAS_BIAS, GROUPED, NF4, ADD_C): rows gathered through one copy (no GATHER_A)
REGISTER_VARIANTS = {name: (trans, epi, scatter, bias, "linear" not in name, nf4, add_c)
                     for name, (trans, epi, _, scatter, bias, nf4, add_c) in VARIANTS.items()}
# 128-row tiles: the MoE's only (lora_linear launches 256)
REGISTER_CASES = [(variant, bmt, rank) for variant in REGISTER_VARIANTS
                  for bmt, rank in [(256, 16), (256, 0), (256, 32), (128, 32)] if bmt == 256 or "linear" not in variant]


def build_register(variant, bmt, rank):
    from fastft.kernels import lora_linear_hopper as llh
    fn = llh._gemm_kernel
    trans, epi, scatter, has_bias, grouped, nf4, add_c = REGISTER_VARIANTS[variant]
    r_pad = max(16, triton.next_power_of_2(rank)) if rank else 0
    const = dict(TRANS=trans, NF4=nf4, HAS_BIAS=has_bias, ADD_C=add_c and not rank, R_PAD=r_pad, AHEAD2=not trans,
                 GROUPED=grouped, EPI=epi, SCATTER=scatter, LORA_X3=grouped and rank > 0,
                 BNW=llh.BNW, BMT=bmt, BK=llh.BK, STAGES=llh.STAGES, LOAD_REGS=llh.LOAD_REGS,
                 num_warps=llh.NUM_WARPS)

    def desc(dt, shape, swizzle, bits):
        return (f"tensordesc<{dt}[{shape[0]}, {shape[1]}],NVMMASharedLayout(swizzle_byte_width={swizzle}, "
                f"element_bitwidth={bits}, rank=2, transposed=False, fp4_padded=False, cga_layout=[])>")
    w_box = [llh.BK, llh.BNW // 2] if trans else [llh.BNW, llh.BK // 2]
    pointers = dict(POINTERS, x_desc=desc("bf16", [bmt, llh.BK], 128, 16), c_desc=desc("bf16", [bmt, llh.BNW], 128, 16),
                    w_desc=desc("u8", w_box, min(128, w_box[1]), 8), WS="*fp32" if nf4 else "*u8",
                    L="*fp32" if grouped else "*bf16", LF="*fp32" if grouped else "*bf16")
    sig = {n: "constexpr" if n in const else pointers.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}
    odd = ODD + ("S_COLS", "T", "s_lfn", "s_lfr", "s_lfe", "row_tiles")
    attrs = {(i, ): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n not in odd}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=llh.NUM_WARPS, num_stages=1))


def summary(c):
    return {"smem": c.metadata.shared, "wgmma": "wgmma.mma_async" in c.asm["ptx"],
            "main_loop_spills": main_loop_spills(c.asm["cubin"])}


def build_all() -> dict:
    out = {f"{variant}/{bm}/{lora}/{tiles}": summary(build(variant, bm, lora, tiles))
           for variant, bm, lora, tiles in CASES}
    out.update({f"register {variant}/{bmt}/{rank}": summary(build_register(variant, bmt, rank))
                for variant, bmt, rank in REGISTER_CASES})
    return out


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="triton without its bundled ptxas")
@pytest.mark.parametrize("variant,bm,lora,tiles", CASES)
def test_builds_for_sm90_within_smem_without_main_loop_spills(builds, variant, bm, lora, tiles):
    c = builds[f"{variant}/{bm}/{lora}/{tiles}"]
    assert c["smem"] <= SMEM_LIMIT
    assert c["wgmma"]
    assert c["main_loop_spills"] == 0


@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="triton without its bundled ptxas")
@pytest.mark.parametrize("variant,bmt,rank", REGISTER_CASES)
def test_register_kernel_builds_for_sm90_within_smem_without_main_loop_spills(builds, variant, bmt, rank):
    c = builds[f"register {variant}/{bmt}/{rank}"]
    assert c["smem"] <= SMEM_LIMIT
    assert c["wgmma"]
    # rank 32 at 256 rows: a few stores / loads of tile scalars around the LoRA wgmmas after the K loop, once per
    # tile (gate_up forward: 10; nf4 dX: 1), which main_loop_spills' window includes; none inside the K loop
    assert c["main_loop_spills"] <= (10 if (bmt, rank) == (256, 32) else 0)


if __name__ == "__main__":
    print(json.dumps(build_all()))
