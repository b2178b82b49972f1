"""Every decode kernel configuration compiled for an H100 (sm_90a) with no GPU: XLA's own
deviceless compile (pallas_kernels.deviceless). Fails on a compile error, any spill, shared memory
over the opt-in limit, more than the planned kernels per call, more than 4 barriers per loop
iteration, or a K/V pipeline less than 2 tiles deep.

Needs the CUDA PJRT plugin (scripts/install_gpu_compile.sh) and ptxas; without them the compile
tests skip with a message naming what is missing, unless CHUNKATTN_REQUIRE_SM90=1 (CI sets it),
which turns the skip into a failure. The parser tests below need nothing.
"""

import os

import pytest

from configs import kernel_resources as kernel_resources_config
from experiments import kernel_resources
from pallas_kernels import deviceless
from pallas_kernels.sequence_first import CUDA_CORE_MAX_GROUP, mma_rows

REQUIRE = os.environ.get("CHUNKATTN_REQUIRE_SM90") == "1"
OPTIN_SMEM = deviceless.H100.smem_per_block_optin


def require_sm90_toolchain() -> None:
  """Skips the calling test when the deviceless toolchain (CUDA PJRT plugin, ptxas) is missing,
  with a message naming what is missing; fails it instead under CHUNKATTN_REQUIRE_SM90=1 (CI)."""
  try:
    deviceless.check_toolchain()
  except deviceless.ToolchainMissing as e:
    if REQUIRE:
      pytest.fail(f"CHUNKATTN_REQUIRE_SM90=1 but {e}")
    pytest.skip(str(e))

# Deliberately bad knobs: fp32 products on CUDA cores with 64 x 32 blocks spill; 64 x 64 blocks
# with 4 stages need more shared memory than an H100 has (XLA refuses to compile).
SPILL_SPEC = dict(builder="pallas_kernels.deviceless:decode_call", kwargs=dict(
    d=128, c=64, dtype="float32", g=1,
    chunk_first_config=dict(block_m=64, block_n=32, num_warps=4, num_stages=2)))
SMEM_SPEC = dict(builder="pallas_kernels.deviceless:decode_call", kwargs=dict(
    d=128, c=64, dtype="float32", g=1,
    chunk_first_config=dict(block_m=64, block_n=64, num_warps=4, num_stages=4)))
NO_ITEMS_SPEC = dict(builder="pallas_kernels.deviceless:decode_call",
                     kwargs=dict(d=128, c=64, dtype="float16", g=4, items=0))
# Rows carrying T > 1 new tokens (speculative verification, short chunked prefills).
MULTI_TOKEN_SPECS = [dict(builder="pallas_kernels.deviceless:decode_call",
                          kwargs=dict(d=128, c=64, dtype=dtype, g=g, tokens_per_row=T))
                     for dtype in ("bfloat16", "float32")
                     for g, T in ((1, 2), (1, 8), (4, 2), (4, 8), (8, 8))]  # T * g <= 64


@pytest.fixture(scope="module")
def sweep():
  require_sm90_toolchain()
  base = kernel_resources.specs(kernel_resources_config.get_config())
  specs = base + MULTI_TOKEN_SPECS
  reports = deviceless.compile_specs(specs + [SPILL_SPEC, SMEM_SPEC, NO_ITEMS_SPEC])
  errors = [(spec["kwargs"], rep.error) for spec, rep in zip(specs, reports) if rep.error]
  assert not errors, errors  # every supported configuration compiles
  rows = [dict(row, tokens_per_row=spec["kwargs"].get("tokens_per_row", 1))
          for spec, rep in zip(specs, reports) for row in kernel_resources.rows_of(spec, rep)]
  return specs, reports[:len(specs)], rows, reports[-3:-1], reports[-1]


def test_every_configuration_compiles_without_spills_within_shared_memory(sweep):
  specs, _, rows, _, _ = sweep
  assert len(specs) == 3 * 4 * 3 * 4 + len(MULTI_TOKEN_SPECS) and len(rows) == 2 * len(specs)
  for r in rows:
    assert r["registers"] > 0, r  # ptxas ran on the kernel's PTX
    assert r["spill_bytes"] == 0, r
    assert r["smem_bytes"] <= OPTIN_SMEM, r
    assert r["ctas_per_sm"] >= 1, r


def test_two_kernels_per_decode_call_and_one_without_shared_items(sweep):
  _, reports, _, _, no_items = sweep
  for rep in reports:
    names = [k.kernel for k in rep.kernels]
    assert rep.num_gpu_kernels == 2, names  # no transposes, pads, slices or zero-fills
    assert names[0].startswith("chunk_first") and names[1].startswith("sequence_first")
  assert no_items.num_gpu_kernels == 1
  assert no_items.kernels[0].kernel.startswith("sequence_first")


def test_barriers_per_loop_iteration(sweep):
  _, _, rows, _, _ = sweep
  for r in rows:
    assert r["barriers_per_iteration"] <= 4, r


def test_kv_pipelines_keep_two_tiles_in_flight(sweep):
  """Every cp.async tile loop waits with >= 2 tiles still loading; the CUDA-core loops (no
  cp.async: the compiler pipelines only loads that feed a dot) prefetch two tiles in registers
  by construction (see sequence_first._private_cuda_core) and use no barrier."""
  _, reports, _, _, _ = sweep
  for rep in reports:
    for k in rep.kernels:
      for loop in k.loops:
        if loop.cp_async_groups:
          assert loop.tiles_in_flight >= 2, (k.kernel, loop)
      if k.kernel.endswith("_cuda"):
        assert k.mma == "fma" and all(lp.cp_async_groups == 0 for lp in k.loops)


def test_tensor_core_use(sweep):
  _, _, rows, _, _ = sweep
  for r in rows:
    if r["dtype"] == "float32":
      assert r["mma"] == "fma", r  # full fp32 products (tensor cores would round to TF32)
    elif r["kernel"].startswith("chunk_first"):
      assert r["mma"] == "wgmma", r
    elif r["g"] * r["tokens_per_row"] > CUDA_CORE_MAX_GROUP:
      # Tensor-core path: 16 rows (one warp's MMA) or a 64-row warpgroup block (more than 16
      # queries, or d = 256).
      rows16 = mma_rows(r["g"] * r["tokens_per_row"], r["dtype"], r["d"]) == 16
      assert r["mma"] == ("mma.sync" if rows16 else "wgmma"), r


def test_the_check_catches_spills_and_shared_memory_overflow(sweep):
  spill, smem = sweep[3]
  cf = next(k for k in spill.kernels if k.kernel.startswith("chunk_first"))
  assert spill.error is None and cf.spill_bytes > 0
  assert smem.error is not None and "Shared memory size limit exceeded" in smem.error


# --- Parsers (no toolchain needed) ---------------------------------------------------------------
PTX = """
.entry k(
)
{
	ld.global.b32 	%r1, [%rd1];
$L__BB0_1:
	cp.async.cg.shared.global [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, %r3;
	cp.async.commit_group;
	cp.async.cg.shared.global [ %r2 + 0 ], [ %rd2 + 0 ], 0x10, %r3;
	cp.async.commit_group;
	cp.async.wait_group 	4;
	bar.sync 	0;
	mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%r1}, {%r2}, {%r3}, {%r4};
	bar.sync 	0;
	@%p1 bra 	$L__BB0_1;
$L__BB0_2:
	ld.global.v4.b32 	{%r5, %r6, %r7, %r8}, [%rd3];
	@%p2 bra 	$L__BB0_3;
	ld.global.v4.b32 	{%r5, %r6, %r7, %r8}, [%rd3];
$L__BB0_3:
	@%p3 bra 	$L__BB0_2;
	ret;
}
"""


def test_ptx_loops_and_entry():
  assert deviceless.ptx_entry(PTX) == "k"
  loops = deviceless.ptx_loops(PTX)
  assert len(loops) == 2
  first, second = loops
  assert (first.barriers, first.mma, first.cp_async_groups, first.tiles_in_flight) == (
      2, "mma.sync", 2, 2)
  assert (second.barriers, second.mma, second.global_loads) == (0, "fma", 2)


def test_ptxas_thunks_and_occupancy():
  info = deviceless.parse_ptxas(
      "ptxas info    : Function properties for k\n"
      "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
      "ptxas info    : Used 168 registers, used 1 barriers\n")
  assert info == dict(registers=168, spill_bytes=20, stack_bytes=16)
  thunks = deviceless.parse_thunks(
      "001: kCustomKernel [source | next=002 (1)] chunk_first_g1 grid: [16, 32, 1] "
      "threads: [128, 1, 1]  shared_memory: 81920 bytes\n"
      "002: kCustomKernel [prev=001 (1) | sink] sequence_first_g1 grid: [32, 32, 1] "
      "threads: [128, 1, 1]  shared_memory: 2048 bytes\n")
  assert thunks == [("kCustomKernel", "chunk_first_g1", (16, 32, 1), 128, 81920),
                    ("kCustomKernel", "sequence_first_g1", (32, 32, 1), 128, 2048)]
  k = deviceless.KernelResources("x", (1,), threads=128, smem_bytes=81920, registers=168)
  assert k.ctas_per_sm() == 2  # shared memory: 233472 // (81920 + 1024)
  k = deviceless.KernelResources("x", (1,), threads=32, smem_bytes=0, registers=255)
  assert k.ctas_per_sm() == 8  # registers: 65536 // (256 * 32)


def test_missing_toolchain_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv(deviceless.PLUGIN_ENV, str(tmp_path / "nowhere"))
  with pytest.raises(deviceless.ToolchainMissing, match="CUDA PJRT plugin"):
    deviceless.check_toolchain()
