"""What tests/test_docs.py reads in the documents: pages, links, headings' anchors,
command blocks and the flags of the commands they run.

A command's flags are parsed as its program parses them, without importing it: the
program's flag definitions (absl's `flags.DEFINE_*`, argparse's `add_argument`) are
read from its source and made again in a fresh parser.
"""

import argparse
import ast
import functools
import pathlib
import re
import shlex
import unicodedata

from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / 'README.md', REPO / 'BENCHMARKS.md', *(REPO / 'docs').glob('*.md'),
                *(REPO / 'experiments' / 'recipes').glob('*.md')])
SHELL_BLOCKS = ('bash', 'sh', 'shell')

_FENCE = re.compile(r'^```(\w*)[^\n]*\n(.*?)^```', flags=re.M | re.S)
_LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
_PYTHON = re.compile(r'(.*/)?python(3(\.\d+)?)?$')


def name(path: pathlib.Path) -> str:
  """The path from the repository's root (as it is, outside the repository)."""
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def blocks(text: str):
  """(language, code, line of the code's first line) of each fenced block."""
  for m in _FENCE.finditer(text):
    yield m.group(1), m.group(2), text.count('\n', 0, m.start(2)) + 1


def prose(text: str) -> str:
  """The text with its fenced blocks blanked (their lines kept, so numbers hold)."""
  return _FENCE.sub(lambda m: '\n' * m.group(0).count('\n'), text)


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, only letters, digits, '-', '_' and
  spaces kept, spaces made '-'."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip().lower())
  kept = ''.join(c for c in text if c in ' -_' or unicodedata.category(c)[0] in 'LMN')
  return kept.replace(' ', '-')


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors of a page's headings, repeated ones numbered as GitHub does."""
  seen, result = {}, set()
  for heading in re.findall(r'^#+\s+(.+?)\s*#*$', prose(path.read_text()), flags=re.M):
    base = slug(heading)
    count = seen.get(base, 0)
    seen[base] = count + 1
    result.add(base if count == 0 else f'{base}-{count}')
  return result


def links(path: pathlib.Path):
  """(line, target) of each link and image outside code blocks."""
  text = re.sub(r'`[^`\n]*`', '', prose(path.read_text()))
  for m in _LINK.finditer(text):
    yield text.count('\n', 0, m.start()) + 1, m.group(1)


def _logical_lines(code: str):
  """A block's commands: continuation lines joined, and lines inside a quoted word;
  comment lines dropped."""
  lines, pending = [], ''
  for line in code.replace('\\\n', ' ').splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith('#')):
      continue
    pending = f'{pending}\n{line}' if pending else line
    try:
      shlex.split(pending, comments=True)
    except ValueError:  # a quotation still open
      continue
    lines.append(pending)
    pending = ''
  assert not pending, f'unclosed quotation in {pending!r}'
  return lines


def _split(line: str) -> list[str]:
  """Shell words; a quoted word holding a command (`--command="cd x && python …"`)
  is split in turn."""
  words = []
  for word in shlex.split(line, comments=True):
    inner = word.split('=', 1)[-1]
    words += _split(inner) if (' ' in inner or '\n' in inner) and 'python' in inner else [word]
  return words


def commands(code: str):
  """(program, arguments) of every `python -m vdm_jax.*` or `python experiments/*.py`
  in a shell block; program is the path of the module or script."""
  for line in _logical_lines(code):
    words = _split(line)
    pieces, piece = [], []
    for word in words + [';']:
      if word in ('&&', '||', ';', '|'):
        pieces.append(piece)
        piece = []
      else:
        piece.append(word)
    for piece in pieces:
      for i, word in enumerate(piece):
        if not _PYTHON.match(word) or i + 1 >= len(piece):
          continue
        rest = piece[i + 1:]
        if rest[0] == '-m' and len(rest) > 1 and rest[1].startswith('vdm_jax'):
          yield REPO / (rest[1].replace('.', '/') + '.py'), rest[2:]
        elif rest[0].startswith('experiments/'):
          yield REPO / rest[0], rest[1:]
        break


@functools.lru_cache(maxsize=None)
def _constants(script: pathlib.Path) -> dict:
  """The script's module-level constants (`MODES = ('train', 'eval')`)."""
  found = {}
  for node in ast.parse(script.read_text()).body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
        node.targets[0], ast.Name):
      try:
        found[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        pass
  return found


@functools.lru_cache(maxsize=None)
def _definitions(script: pathlib.Path, kind: str) -> tuple:
  """The script's flag definitions, compiled to be evaluated against a fresh parser:
  absl's `flags.DEFINE_*(…)` with `flag_values=` (and the config file's `sys_argv=`)
  added, or argparse's `add_argument(…)` called on `parser`."""
  compiled = []
  for node in ast.walk(ast.parse(script.read_text())):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    extra = []
    if kind == 'absl' and node.func.attr.startswith('DEFINE') and isinstance(
        node.func.value, ast.Name) and node.func.value.id in ('flags', 'config_flags'):
      extra = ['flag_values'] + (['sys_argv'] if node.func.attr == 'DEFINE_config_file' else [])
    elif kind == 'argparse' and node.func.attr == 'add_argument':
      node.func = ast.Attribute(value=ast.Name(id='parser', ctx=ast.Load()),
                                attr='add_argument', ctx=ast.Load())
    else:
      continue
    node.keywords += [ast.keyword(arg=k, value=ast.Name(id=k, ctx=ast.Load())) for k in extra]
    expression = ast.fix_missing_locations(ast.Expression(node))
    compiled.append(compile(expression, str(script), 'eval'))
  return tuple(compiled)


def _define(script: pathlib.Path, kind: str, **names) -> None:
  for code in _definitions(script, kind):
    eval(code, {**_constants(script), 'flags': flags, 'config_flags': config_flags,  # pylint: disable=eval-used
                'argparse': argparse, **names})


def absl_flags(script: pathlib.Path, argv: list[str]) -> flags.FlagValues:
  """A FlagValues holding the flags `script` defines with absl (and config files')."""
  values = flags.FlagValues()
  _define(script, 'absl', flag_values=values, sys_argv=argv)
  return values


def argparse_parser(script: pathlib.Path) -> argparse.ArgumentParser | None:
  """The ArgumentParser `script` builds, or None where it uses none."""
  if not _definitions(script, 'argparse'):
    return None
  parser = argparse.ArgumentParser(prog=name(script), exit_on_error=False)
  _define(script, 'argparse', parser=parser)
  return parser


def flag_names(script: pathlib.Path) -> set[str]:
  """Every flag `script` accepts, as written after `--` (`noX` for absl booleans)."""
  parser = argparse_parser(script)
  if parser is not None:
    return {o[2:] for a in parser._actions for o in a.option_strings if o.startswith('--')}  # pylint: disable=protected-access
  values = absl_flags(script, ['prog'])
  names = set()
  for flag_name, flag in values._flags().items():  # pylint: disable=protected-access
    names.add(flag_name)
    if flag.boolean:
      names.add('no' + flag_name)
  return names
