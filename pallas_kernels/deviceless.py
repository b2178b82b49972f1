"""Compile kernels for an H100 (sm_90a) on a machine without a GPU, and read their resources.

XLA's own GPU compiler runs deviceless from a CUDA target description (no driver is touched), so
what it builds is exactly what a GPU run would launch: the optimized HLO (how many kernels one call
launches), each kernel's grid, threads and shared memory (its thunk sequence), and the PTX that it
hands to ``ptxas`` (captured on the way; ``ptxas -v`` then gives registers, spills and barriers).
The PTX of each kernel's loops says which matrix instruction it uses, how many ``bar.sync`` one
iteration executes and how deep the ``cp.async`` pipeline is.

What it needs (``scripts/install_gpu_compile.sh`` installs the first):

* the CUDA PJRT plugin of the pinned jax, ``jax-cuda13-plugin`` and ``jax-cuda13-pjrt`` 0.11.2,
  installed *outside* the environment's site-packages (a directory named by
  ``$CHUNKATTN_XLA_CUDA_PLUGIN``, default ``<sys.prefix>/xla-cuda-plugin``): in site-packages jax
  would try to start it on every import;
* ``ptxas`` and libdevice of a CUDA 12.8+ toolkit (``PATH``, ``$CUDA_HOME`` or ``/usr/local/cuda``).

Mosaic GPU kernels (``pallas_kernels.mosaic_decode``) are compiled by Mosaic itself, not by XLA's
ptxas call: the worker sets ``MOSAIC_GPU_DUMP_TO`` (with ``_PTX``, ``_PTXAS`` and ``_RESOURCES``)
and reads, per kernel, Mosaic's ptxas report (registers, spills), its launch (grid, threads,
dynamic shared memory, from the lowered module) and its mbarrier count; XLA's thunk sequence lists
each such kernel as a ``kCustomCall``, matched to the dumps in compile order.

The compile runs in a subprocess (``python -m pallas_kernels.deviceless`` reads a JSON list of
specs on stdin) with ``JAX_PLATFORMS=cpu``. `compile_specs` is the entry point; a spec names a
*builder* ``"module:function"`` called with the spec's keyword arguments, which returns
``(fn, args)``: the jitted function and its arguments as ``jax.ShapeDtypeStruct``s.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

PLUGIN_ENV = "CHUNKATTN_XLA_CUDA_PLUGIN"

# XLA's GpuTargetConfigProto for an H100 SXM (values of the card; text format).
H100_TARGET_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152 shared_memory_per_core: 233472
  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  cuda_compute_capability { major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation" platform_version: "Compute Capability 9.0a"
  name: "NVIDIA H100 80GB HBM3"
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Gpu:
  """The per-SM limits that decide occupancy (H100 SXM values)."""

  name: str = "H100 SXM (sm_90a)"
  num_sms: int = 132
  smem_per_sm: int = 233472
  smem_per_block_optin: int = 232448
  smem_reserved_per_block: int = 1024
  registers_per_sm: int = 65536
  max_threads_per_sm: int = 2048
  max_blocks_per_sm: int = 32


H100 = Gpu()


class ToolchainMissing(RuntimeError):
  """The deviceless compile cannot run here; the message says what is missing and how to get it."""


@dataclasses.dataclass
class Loop:
  """One innermost loop of a kernel's PTX that reads global memory."""

  barriers: int  # bar.sync / barrier.sync executed per iteration
  mma: str  # "wgmma", "mma.sync" or "fma" (no tensor-core instruction)
  cp_async_groups: int  # cp.async groups committed per iteration
  tiles_in_flight: int  # cp.async groups left pending at the wait, in iterations' worth
  global_loads: int  # ld.global instructions per iteration (not cp.async)
  tma_copies: int = 0  # cp.async.bulk (TMA) copies issued per iteration


@dataclasses.dataclass
class KernelResources:
  """One GPU kernel of a compiled call."""

  kernel: str
  grid: tuple[int, ...]
  threads: int
  smem_bytes: int
  registers: int = 0
  spill_bytes: int = 0  # spill stores + spill loads, bytes
  stack_bytes: int = 0
  loops: list[Loop] = dataclasses.field(default_factory=list)
  mbarriers: int = 0  # mbarrier objects in shared memory (Mosaic kernels)

  def ctas_per_sm(self, gpu: Gpu = H100) -> int:
    """Resident blocks per SM allowed by registers, shared memory, threads and the block limit."""
    warps = math.ceil(self.threads / 32)
    regs_per_warp = math.ceil(max(self.registers, 1) * 32 / 256) * 256  # allocation unit: 256
    by_regs = gpu.registers_per_sm // (warps * regs_per_warp)
    by_smem = gpu.smem_per_sm // (self.smem_bytes + gpu.smem_reserved_per_block)
    by_threads = gpu.max_threads_per_sm // self.threads
    return max(0, min(by_regs, by_smem, by_threads, gpu.max_blocks_per_sm))

  @property
  def barriers_per_iteration(self) -> int:
    """Most barriers one iteration of any global-memory loop executes."""
    return max((lp.barriers for lp in self.loops), default=0)

  @property
  def mma(self) -> str:
    kinds = {lp.mma for lp in self.loops}
    return next((k for k in ("wgmma", "mma.sync") if k in kinds), "fma")


@dataclasses.dataclass
class CompileReport:
  """What one compiled call launches (or why XLA refused to compile it: `error`)."""

  num_gpu_kernels: int  # kernel launches in the optimized program (thunks that run on the GPU)
  kernels: list[KernelResources]
  hlo: str  # the optimized HLO module, as text
  error: str | None = None  # e.g. "RESOURCE_EXHAUSTED: Shared memory size limit exceeded ..."


# --------------------------------------------------------------------------------------------
# PTX and ptxas parsing (pure text; also used by the tests).
# --------------------------------------------------------------------------------------------
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_BARRIER = re.compile(r"\b(?:bar|barrier)(?:\.cta)?\.(?:sync|red)\b")


def ptx_loops(ptx: str) -> list[Loop]:
  """Innermost loops that read global memory.

  A loop is a label and the last branch back to it (other branches back to the same label, such
  as an outer loop's path that skips its inner loop, belong to the same loop); innermost = no other
  loop inside it.
  """
  lines = ptx.splitlines()
  labels = {}
  back = {}
  for n, line in enumerate(lines):
    m = _LABEL.match(line)
    if m:
      labels[m.group(1)] = n
    m = _BRANCH.search(line)
    if m and m.group(1) in labels:
      back[m.group(1)] = n
  spans = [(labels[name], end) for name, end in back.items()]
  innermost = [s for s in spans
               if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
  loops = []
  for start, end in innermost:
    body = "\n".join(lines[start:end + 1])
    cp_async = len(re.findall(r"\bcp\.async\.c[ag]\.", body))
    ldg = len(re.findall(r"\bld\.global\.", body))
    tma = len(re.findall(r"\bcp\.async\.bulk\.(?:tensor\.\w+\.)?shared", body))
    if not (cp_async or ldg or tma):
      continue
    commits = body.count("cp.async.commit_group")
    waits = [int(w) for w in re.findall(r"cp\.async\.wait_group\s+(\d+)", body)]
    if "wgmma.mma_async" in body:
      mma = "wgmma"
    elif re.search(r"\bmma\.sync\b", body):
      mma = "mma.sync"
    else:
      mma = "fma"
    in_flight = (min(waits) // commits) if commits and waits else 0
    loops.append(Loop(barriers=len(_BARRIER.findall(body)), mma=mma, cp_async_groups=commits,
                      tiles_in_flight=in_flight, global_loads=ldg, tma_copies=tma))
  return loops


def ptx_entry(ptx: str) -> str | None:
  m = re.search(r"\.entry\s+(\w+)", ptx)
  return m.group(1) if m else None


def parse_ptxas(text: str) -> dict:
  """registers, spill_bytes, stack_bytes from `ptxas -v` output of one entry function."""
  regs = re.search(r"Used (\d+) registers", text)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
  stack = re.search(r"(\d+) bytes stack frame", text)
  return dict(registers=int(regs.group(1)) if regs else 0,
              spill_bytes=(int(spills.group(1)) + int(spills.group(2))) if spills else 0,
              stack_bytes=int(stack.group(1)) if stack else 0)


_LAUNCH = re.compile(
    r"blocks\([^)]*\) in \(" + r",\s*".join([r"%\S+ = %c(\d+)\w*"] * 3) + r"\) threads\([^)]*\) in "
    r"\(" + r",\s*".join([r"%\S+ = %c(\d+)\w*"] * 3) + r"\) dynamic_shared_memory_size %c(\d+)")


def parse_mosaic_launch(mlir: str) -> tuple[tuple[int, ...], int, int]:
  """(grid, threads, dynamic shared memory bytes) of the last `gpu.launch` in Mosaic's lowered
  module text (its MLIR pass log). The grid is CUDA's (x, y, z): the kernel's grid reversed."""
  found = _LAUNCH.findall(mlir)
  if not found:
    return (), 0, 0
  *dims, smem = (int(x) for x in found[-1])
  return tuple(dims[:3]), math.prod(dims[3:]), smem


def parse_mosaic_resources(text: str) -> int:
  """mbarriers allocated, from Mosaic's `Resources(...)` dump."""
  return sum(int(n) for n in re.findall(r"num_barriers=(\d+)", text))


def mosaic_dumps(directory: str) -> list[dict]:
  """The kernels Mosaic compiled into `directory` (MOSAIC_GPU_DUMP_TO), in compile order."""
  found = {}
  for f in glob.glob(os.path.join(directory, "*.ptxas")):
    m = re.match(r"(.+)_(\d+)$", os.path.basename(f)[:-len(".ptxas")])
    if m:
      found[int(m.group(2))] = (m.group(1), f[:-len(".ptxas")])
  out = []
  for n in sorted(found):
    name, base = found[n]
    read = lambda ext: open(base + ext).read() if os.path.exists(base + ext) else ""
    grid, threads, smem = parse_mosaic_launch(read(".mlir-passes.log"))
    k = dict(kernel=name, grid=list(grid), threads=threads, smem_bytes=smem,
             mbarriers=parse_mosaic_resources(read(".resources.txt")), loops=[])
    k.update(parse_ptxas(read(".ptxas")))
    k["loops"] = [dataclasses.asdict(lp) for lp in ptx_loops(read(".ptx"))]
    out.append(k)
  return out


_THUNK = re.compile(r"^\d+:\s+(k\w+)\s+\[[^\]]*\]\s+(\S+)(.*)$")


def parse_thunks(text: str) -> list[tuple[str, str, tuple[int, ...], int, int]]:
  """(kind, name, grid, threads, smem) of every thunk in XLA's thunk_sequence dump."""
  out = []
  for line in text.splitlines():
    m = _THUNK.match(line.strip())
    if not m:
      continue
    kind, name, rest = m.groups()
    grid = re.search(r"grid:\s*\[([\d,\s]+)\]", rest)
    threads = re.search(r"threads:\s*\[([\d,\s]+)\]", rest)
    smem = re.search(r"shared_memory:\s*(\d+)", rest)
    out.append((kind, name,
                tuple(int(x) for x in grid.group(1).split(",")) if grid else (),
                math.prod(int(x) for x in threads.group(1).split(",")) if threads else 0,
                int(smem.group(1)) if smem else 0))
  return out


# Thunks that are bookkeeping on the host, not work on the GPU.
_HOST_THUNKS = ("kSequential", "kCommandBuffer", "kWhile", "kConditional", "kWaitForStreams",
                "kHostSend", "kHostRecv", "kHostSendDone", "kHostRecvDone")


# --------------------------------------------------------------------------------------------
# Toolchain discovery.
# --------------------------------------------------------------------------------------------
def plugin_dir() -> str:
  return os.environ.get(PLUGIN_ENV) or os.path.join(sys.prefix, "xla-cuda-plugin")


def find_ptxas() -> str | None:
  for cand in (shutil.which("ptxas"),
               os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas"),
               "/usr/local/cuda/bin/ptxas"):
    if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
      return cand
  return None


def check_toolchain() -> None:
  """Raises ToolchainMissing naming what is missing (the tests skip with this message)."""
  missing = []
  if not glob.glob(os.path.join(plugin_dir(), "jax_plugins", "xla_cuda*")):
    missing.append(f"the CUDA PJRT plugin in {plugin_dir()} (run scripts/install_gpu_compile.sh, "
                   f"or set {PLUGIN_ENV})")
  if find_ptxas() is None:
    missing.append("ptxas from a CUDA 12.8+ toolkit (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin)")
  if missing:
    raise ToolchainMissing("deviceless sm_90a compile unavailable: missing " + "; ".join(missing))


# --------------------------------------------------------------------------------------------
# Driver (this process) and worker (the subprocess).
# --------------------------------------------------------------------------------------------
def compile_specs(specs: list[dict], *, workers: int | None = None,
                  timeout_s: float = 3600.0) -> list[CompileReport]:
  """Compiles every spec ({"builder": "module:function", "kwargs": {...}}) for an H100.

  `workers` subprocesses (default: the CPU count) share the specs. Raises ToolchainMissing when
  the toolchain is absent, RuntimeError when a compile fails (with the worker's error output).
  """
  check_toolchain()
  workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
  shares = [specs[w::workers] for w in range(workers)]
  with tempfile.TemporaryDirectory(prefix="sm90-") as tmp:
    procs = [_start_worker(share, os.path.join(tmp, str(w))) for w, share in enumerate(shares)]
    try:
      results = [_finish_worker(p, len(share), timeout_s) for p, share in zip(procs, shares)]
    finally:
      for p in procs:  # a failed worker must not leave the others running
        if p.poll() is None:
          p.kill()
          p.wait()
        if not p.stdout.closed:
          p.stdout.close()
  out = [None] * len(specs)
  for w, reports in enumerate(results):
    out[w::workers] = reports
  return out


def _start_worker(specs: list[dict], tmp: str) -> subprocess.Popen:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  wrapper_dir = os.path.join(tmp, "bin")
  os.makedirs(wrapper_dir)
  # XLA runs the first `ptxas` on PATH; this one keeps a copy of the PTX it is given.
  with open(os.path.join(wrapper_dir, "ptxas"), "w") as f:
    f.write(f'#!/bin/sh\n[ -f "$1" ] && cp "$1" "$PTX_DUMP_DIR/$(basename "$1").ptx"\n'
            f'exec "{find_ptxas()}" "$@"\n')
  os.chmod(os.path.join(wrapper_dir, "ptxas"), 0o755)
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu", JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1",
      PATH=wrapper_dir + os.pathsep + env.get("PATH", ""),
      PYTHONPATH=os.pathsep.join([plugin_dir(), repo, env.get("PYTHONPATH", "")]),
      XLA_FLAGS=(env.get("XLA_FLAGS", "") + f" --xla_dump_to={os.path.join(tmp, 'xla')}"),
      SM90_TMP=tmp, TF_CPP_MIN_LOG_LEVEL="2", MOSAIC_GPU_DUMP_TO=os.path.join(tmp, "mosaic"),
      MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_RESOURCES="1",
      MOSAIC_GPU_DUMP_MLIR_PASSES="1")
  os.makedirs(env["MOSAIC_GPU_DUMP_TO"])
  # stderr to a file: a worker blocked on a full stderr pipe would never finish its stdout.
  log_path = os.path.join(tmp, "stderr.txt")
  with open(log_path, "w") as log:  # the child keeps its own handle
    proc = subprocess.Popen([sys.executable, "-m", "pallas_kernels.deviceless"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                            env=env, cwd=repo)
  proc.log_path = log_path
  proc.stdin.write(json.dumps(specs))
  proc.stdin.close()
  return proc


def _finish_worker(proc: subprocess.Popen, n: int, timeout_s: float) -> list[CompileReport]:
  try:
    with proc.stdout:
      stdout = proc.stdout.read()
    proc.wait(timeout=timeout_s)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  with open(proc.log_path) as f:
    stderr = f.read()
  if proc.returncode:
    raise RuntimeError(f"deviceless compile failed (exit {proc.returncode}):\n{stderr[-6000:]}")
  reports = []
  for line in stdout.splitlines():
    if not line.startswith("{"):
      continue
    r = json.loads(line)
    kernels = [KernelResources(**dict(k, grid=tuple(k["grid"]),
                                      loops=[Loop(**lp) for lp in k["loops"]]))
               for k in r["kernels"]]
    reports.append(CompileReport(r["num_gpu_kernels"], kernels, r["hlo"], r.get("error")))
  if len(reports) != n:
    raise RuntimeError(f"deviceless compile returned {len(reports)} reports for {n} specs:\n"
                       f"{stderr[-6000:]}")
  return reports


def _import(path: str):
  module, name = path.split(":")
  return getattr(__import__(module, fromlist=[name]), name)


def _worker() -> None:
  import importlib  # noqa: F401  (the builders' modules)

  import jax
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  tmp = os.environ["SM90_TMP"]
  ptx_dir = os.path.join(tmp, "ptx")
  os.makedirs(ptx_dir, exist_ok=True)
  os.environ["PTX_DUMP_DIR"] = ptx_dir
  topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG,
                                      topology="1x1x1")
  mesh = Mesh(topo.devices, ("x",))
  sharding = NamedSharding(mesh, PartitionSpec())
  ptxas = find_ptxas()
  seen_thunk_files: set[str] = set()
  for spec in json.loads(sys.stdin.read()):
    fn, args = _import(spec["builder"])(**spec.get("kwargs", {}))
    args = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), args)
    mosaic_dir = os.environ["MOSAIC_GPU_DUMP_TO"]
    for f in glob.glob(os.path.join(ptx_dir, "*")) + glob.glob(os.path.join(mosaic_dir, "*")):
      os.remove(f)
    try:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(fn).trace(*args).lower().compile()
    except Exception as e:  # pylint: disable=broad-except  (reported per spec, not fatal)
      print(json.dumps(dict(num_gpu_kernels=0, kernels=[], hlo="",
                            error=f"{type(e).__name__}: {str(e)[:2000]}")), flush=True)
      continue
    hlo = compiled.as_text()
    files = sorted(set(glob.glob(os.path.join(tmp, "xla", "*.thunk_sequence.txt")))
                   - seen_thunk_files)
    seen_thunk_files.update(files)
    thunks = [t for f in files for t in parse_thunks(open(f).read())]
    ptx_by_name = {}
    for f in glob.glob(os.path.join(ptx_dir, "*.ptx")):
      src = open(f).read()
      if ptx_entry(src):
        ptx_by_name[ptx_entry(src)] = (f, src)
    kernels = []
    gpu_thunks = [t for t in thunks if t[0] not in _HOST_THUNKS]
    mosaic = mosaic_dumps(mosaic_dir)
    for kind, name, grid, threads, smem in gpu_thunks:
      if kind == "kCustomCall" and mosaic:  # a Mosaic GPU kernel (dumps in compile order)
        kernels.append(mosaic.pop(0))
        continue
      k = dict(kernel=name, grid=list(grid), threads=threads, smem_bytes=smem, loops=[])
      if name in ptx_by_name:
        path, src = ptx_by_name[name]
        out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True)
        k.update(parse_ptxas(out.stdout + out.stderr))
        k["loops"] = [dataclasses.asdict(lp) for lp in ptx_loops(src)]
      kernels.append(k)
    print(json.dumps(dict(num_gpu_kernels=len(gpu_thunks), kernels=kernels, hlo=hlo)),
          flush=True)


# --------------------------------------------------------------------------------------------
# Builders for this package's kernels.
# --------------------------------------------------------------------------------------------
def decode_call(*, d: int, c: int, dtype: str, g: int, h: int = 32, rows: int = 32,
                items: int = 16, chunks_per_item: int = 16, private_chunks: int = 64,
                items_per_row: int = 16, n_chunks: int = 4096, tokens_per_row: int = 1,
                chunk_first_config=None, sequence_first_config=None, impl: str = "pallas",
                mosaic_config=None):
  """`two_phase_decode(impl=impl)` ("pallas" or "mosaic") at the given shapes (configs as dicts
  of knobs); `tokens_per_row` > 1 gives q [rows, T, h, d]."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.chunk_first import ChunkFirstConfig
  from pallas_kernels.mosaic_decode import MosaicConfig
  from pallas_kernels.sequence_first import SequenceFirstConfig
  from pallas_kernels.two_phase import two_phase_decode

  h_kv = h // g
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  dt = jnp.dtype(dtype)
  R, I, G, P, K = rows, items, chunks_per_item, private_chunks, items_per_row  # I = 0: paged plan
  kw = dict(num_rows=i32(), row_private_chunks=i32(R, P), row_private_len=i32(R),
            row_items=i32(R, K), row_num_items=i32(R), item_chunks=i32(I, G),
            item_num_chunks=i32(I), item_row_begin=i32(I), item_row_end=i32(I), item_slot=i32(I),
            length_delta=i32())
  names = list(kw)
  fn = functools.partial(
      two_phase_decode, impl=impl, item_rows_capacity=R,
      mosaic_config=MosaicConfig(**mosaic_config) if mosaic_config else None,
      chunk_first_config=ChunkFirstConfig(**chunk_first_config) if chunk_first_config else None,
      sequence_first_config=(SequenceFirstConfig(**sequence_first_config)
                             if sequence_first_config else None))

  def call(q, k_pool, v_pool, *plan):
    return fn(q, k_pool, v_pool, **dict(zip(names, plan)))

  pool = jax.ShapeDtypeStruct((n_chunks, h_kv, c, d), dt)
  q_shape = (R, h, d) if tokens_per_row == 1 else (R, tokens_per_row, h, d)
  return call, (jax.ShapeDtypeStruct(q_shape, dt), pool, pool, *kw.values())


def prefill_call(*, d: int, c: int, dtype: str, g: int, h: int = 32, seqs: int = 2,
                 tokens: int = 1024, path_chunks: int | None = None, items: int = 0,
                 both: bool = False, n_chunks: int = 4096, config=None):
  """`prefill_attention` (Pallas) at the given shapes; `items > 0` adds the shared-prefix pass
  (two kernels); `both` compiles the call with and without the items in one program (three
  kernels). `config` is a dict of `PrefillConfig` knobs (default: the heuristic)."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels.prefill import PrefillConfig, prefill_attention

  h_kv = h // g
  S, T = seqs, tokens
  Pc = path_chunks or -(-2 * T // c)
  dt = jnp.dtype(dtype)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  shared = (dict(item_seqs=i32(items, S), item_num_seqs=i32(items), item_num_chunks=i32(items),
                 seq_shared_chunks=i32(S)) if items else {})
  fn = functools.partial(prefill_attention,
                         config=PrefillConfig(**config) if config else None)
  names = list(shared)

  def call(q, k_pool, v_pool, positions, chunk_paths, num_tokens, *item_arrays):
    out = fn(q, k_pool, v_pool, positions, chunk_paths, num_tokens,
             **dict(zip(names, item_arrays)))
    if both:
      return out, fn(q, k_pool, v_pool, positions, chunk_paths, num_tokens)
    return out

  pool = jax.ShapeDtypeStruct((n_chunks, h_kv, c, d), dt)
  return call, (jax.ShapeDtypeStruct((S, T, h, d), dt), pool, pool, i32(S, T), i32(S, Pc),
                i32(S), *shared.values())


if __name__ == "__main__":
  _worker()
