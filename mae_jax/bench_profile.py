"""Where a step's time goes: `mae_jax.bench --profile=DIR`.

The timed steps run again under `jax.profiler.trace` (a trace TensorBoard's profile plugin or Perfetto opens);
the time of every XLA op in it (on CPU, one event per thunk with `--xla_cpu_enable_xprof_traceme`; on GPU,
the kernels) is mapped back, through the op's `op_name` in the compiled HLO, to the Flax module, the pass
(forward, or backward: a `transpose(...)` of it) and the part (attention core, linear layers, LayerNorm)
it came from. Ops outside any module are the step's own: the optimizer update, gradient norms, the guard.

The sum is of op durations: ops that run at the same time on different threads count twice, so shares are
of that sum, not of the wall-clock step.
"""
import collections
import glob
import gzip
import json
import re

# The op_name component of a Flax module call under autodiff: 'jvp(ViT)', 'transpose(jvp(MAEDecoder))'.
MODULE_CALL = re.compile(r'^(?:\w+\()*([A-Z]\w*)\)*$')
PARTS = {'qkv': 'linear', 'proj': 'linear', 'fc1': 'linear', 'fc2': 'linear', 'attn': 'attention core',
         'norm1': 'layernorm', 'norm2': 'layernorm', 'norm': 'layernorm', 'fc_norm': 'layernorm',
         'mlp': 'gelu'}


def op_names(hlo_text):
  """{HLO instruction name: its op_name metadata} of a compiled module's text."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def classify(op_name):
  """(module, 'forward' | 'backward', part) of an op, e.g. ('MAEDecoder', 'backward', 'linear')."""
  components = op_name.split('/')
  for index, component in enumerate(components):
    match = MODULE_CALL.match(component)
    if match:
      scope = [c for c in components[index + 1:-1] if not c.startswith(('jit(', 'jvp(', 'transpose('))]
      part = next((PARTS[c] for c in reversed(scope) if c in PARTS), 'other')
      return match.group(1), 'backward' if 'transpose(' in component else 'forward', part
  if op_name.endswith(('select_n', 'is_finite')):
    return 'step', '', 'non-finite guard'
  return 'step', '', 'optimizer, norms, other'


def summarize(trace_dir, hlo_text, steps):
  """Lines of the trace's op time per step, by (module, pass, part), largest first: every one of them (a few
  dozen at most), so no part drops out of the listing when another runs slow."""
  paths = sorted(glob.glob(f'{trace_dir}/**/perfetto_trace.json.gz', recursive=True))
  if not paths:
    return [f'profile                  no perfetto trace under {trace_dir}']
  with gzip.open(paths[-1]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = op_names(hlo_text)
  totals = collections.Counter()
  for event in events:
    op = event.get('args', {}).get('hlo_op')
    if event.get('ph') == 'X' and op:
      totals[classify(names.get(op, op))] += event['dur'] / 1e3 / steps  # us -> ms per step
  everything = sum(totals.values())
  if not everything:
    return [f'profile                  the trace under {trace_dir} has no per-op events on this backend']
  lines = [f'profile                  {everything:.1f} ms of op time per step (ops on parallel threads add up); '
           f'trace in {paths[-1]}']
  for (module, pass_, part), ms in totals.most_common():
    lines.append(f'  {ms:9.1f} ms {100 * ms / everything:5.1f}%  {" ".join(filter(None, (module, pass_, part)))}')
  return lines
