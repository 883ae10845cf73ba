"""The code's structure: no import cycles among vdm_jax modules, no module of the package
or script of experiments/ over 400 lines."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'vdm_jax'
MAX_LINES = 400


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
  parts = path.relative_to(package.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  """{module: the vdm_jax modules it imports}, from every import statement (also those
  inside functions), `from a import b` resolved to the module a.b where b is one."""
  files = {_module_name(p, package): p for p in package.rglob('*.py')}
  graph = {}
  for name, path in files.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets.update(f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in files
                       else node.module for a in node.names)
    graph[name] = {t for t in targets if t in files and t != name}
  return graph


def find_cycle(graph: dict[str, set[str]]):
  """One import cycle as [a, b, …, a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_module_imports_itself_through_others():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_the_cycle_finder_finds_a_cycle_put_into_a_copy_of_the_package(tmp_path):
  copy = tmp_path / 'vdm_jax'
  for path in PACKAGE.rglob('*.py'):
    target = copy / path.relative_to(PACKAGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(path.read_text())
  assert find_cycle(import_graph(copy)) is None
  ode = copy / 'evaluation' / 'ode.py'
  ode.write_text(ode.read_text() + '\n\ndef _late():\n  from vdm_jax import build\n')  # build -> validation -> ode
  cycle = find_cycle(import_graph(copy))
  assert cycle is not None and 'vdm_jax.evaluation.ode' in cycle and 'vdm_jax.build' in cycle


@pytest.mark.parametrize('path', sorted(PACKAGE.rglob('*.py')) + sorted(
    (REPO / 'experiments').glob('*.py')), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_is_at_most_400_lines(path):
  lines = len(path.read_text().splitlines())
  assert lines <= MAX_LINES, f'{path.relative_to(REPO)}: {lines} lines'


def test_the_command_line_imports_tensorflow_only_where_it_writes_events():
  """clu's writers import TensorFlow (~5 CPU-s): the command line, the codec's commands
  included, must not import it before a command writes TensorBoard events."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  probe = ('import sys, vdm_jax.main, vdm_jax.codec.tools; '
           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
           "('tensorflow', 'keras', 'tensorflow_datasets')))")
  out = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout
  assert out.strip() == '[]', out[-2000:]
