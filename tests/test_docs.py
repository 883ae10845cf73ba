"""The documents say only what exists: every link, anchor, config file, config field,
flag and docs/maths.md section that README.md, BENCHMARKS.md, docs/ and
experiments/recipes/ name exists, every command in their shell blocks parses as its
program parses it, and the README's Python example runs as a script saved elsewhere."""

import os
import re
import subprocess
import sys

import pytest

import doc_pages
from doc_pages import name
from doc_pages import PAGES
from doc_pages import REPO
from vdm_jax import config_base

_CITE = re.compile(r"(?<!paper )(?<!paper's )§(\d+(?:\.\d+|[a-z])?)")
_SECTIONS_OF_CONFIG = tuple(config_base.get_config().keys())
_INLINE = re.compile(r'`([^`]+)`')
_FIELD = re.compile(r'^(?:--config\.)?((?:%s)(?:\.\w+)+)(?:=\S*)?$' % '|'.join(_SECTIONS_OF_CONFIG))
_FLAG = re.compile(r'^--(\w+)(?:=\S*)?$')
_PROGRAMS = [REPO / 'vdm_jax' / 'main.py'] + sorted(
    p for p in (REPO / 'experiments').glob('*.py') if 'add_argument' in p.read_text()
    or '__main__' in p.read_text())


def _sections() -> set[str]:
  text = (REPO / 'docs' / 'maths.md').read_text()
  return set(re.findall(r'^#+ §(\S+)', text, flags=re.M))


def _configs():
  """Every config of configs/: a field any of them has may be named."""
  return [config_base.get_config()] + [config_base.load_config(str(p))
                                        for p in sorted((REPO / 'configs').glob('*.py'))]


def _has_field(configs, path: str) -> bool:
  for config in configs:
    node = config
    try:
      for part in path.split('.'):
        node = node[part]
      return True
    except (KeyError, TypeError):
      continue
  return False


def test_the_pages_are_there_and_the_readme_is_short():
  names = {name(p) for p in PAGES}
  for page in ('training', 'storage', 'evaluation', 'sample_quality', 'codec',
               'reproducing', 'reliability', 'findings', 'maths'):
    assert f'docs/{page}.md' in names
  assert len((REPO / 'README.md').read_text().splitlines()) <= 250


def test_the_layout_page_names_every_module_and_script():
  layout = (REPO / 'docs' / 'layout.md').read_text()
  files = [p for p in (REPO / 'vdm_jax').rglob('*.py') if p.name != '__init__.py']
  files += list((REPO / 'experiments').glob('*.py'))
  missing = [name(p) for p in files if not re.search(rf'\b{re.escape(p.name)}\b', layout)]
  assert not missing, f'add to docs/layout.md: {missing}'


def test_every_code_block_names_its_language():
  """So that no command hides from the checks below in an unlabelled block."""
  unlabelled = [f'{name(page)}:{line}' for page in PAGES
                for language, _, line in doc_pages.blocks(page.read_text()) if not language]
  assert not unlabelled, unlabelled


def _section_problems(path, sections: set[str]) -> list[str]:
  return [f'{name(path)}:{number}: §{cited}'
          for number, line in enumerate(path.read_text().splitlines(), 1)
          for cited in _CITE.findall(line) if cited not in sections]


def _config_file_problems(path) -> list[str]:
  return [f'{name(path)}:{number}: configs/{config}.py'
          for number, line in enumerate(path.read_text().splitlines(), 1)
          for config in re.findall(r'\bconfigs/([a-z0-9_]+)\.py', line)
          if not (REPO / 'configs' / f'{config}.py').is_file()]


def _link_problems(page) -> list[str]:
  broken = []
  for line, target in doc_pages.links(page):
    if re.match(r'^[a-z]+:', target):
      continue  # https:, mailto:
    path, _, anchor = target.partition('#')
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.exists():
      broken.append(f'{name(page)}:{line}: {target} (no such file)')
    elif anchor and resolved.suffix == '.md' and anchor not in doc_pages.anchors(resolved):
      broken.append(f'{name(page)}:{line}: {target} (no such heading)')
  return broken


def _inline_problems(page, configs, known: set[str]) -> list[str]:
  """`model.timesteps`, `--config.eval.estimator=ode`, `--overwrite` and whole
  commands in the prose's code spans."""
  missing = []
  text = doc_pages.prose(page.read_text())
  for m in _INLINE.finditer(text):
    line = text.count('\n', 0, m.start()) + 1
    span = ' '.join(m.group(1).split())
    for word in span.split():
      if (field := _FIELD.match(word)) and not _has_field(configs, field.group(1)):
        missing.append(f'{name(page)}:{line}: config field {field.group(1)}')
    flag = _FLAG.match(span)  # a flag alone; in a longer span it may be another program's
    if flag and flag.group(1) not in known and not span.startswith('--xla'):
      missing.append(f'{name(page)}:{line}: flag {span}')
    for program, args in doc_pages.commands(span):
      if (why := _parse(program, args)) is not None:
        missing.append(f'{name(page)}:{line}: {span}: {why}')
  return missing


def _command_problems(page) -> tuple[int, list[str]]:
  """(how many commands the page's shell blocks hold, those refused)."""
  refused, seen = [], 0
  for language, code, line in doc_pages.blocks(page.read_text()):
    if language not in doc_pages.SHELL_BLOCKS:
      continue
    for program, args in doc_pages.commands(code):
      seen += 1
      if not program.is_file():
        refused.append(f'{name(page)}:{line}: no program {name(program)}')
      elif (why := _parse(program, args)) is not None:
        refused.append(f'{name(page)}:{line}: {name(program)} {" ".join(args)}: {why}')
  return seen, refused


def _parse(program, args):
  """Parses `args` as `program` does; returns what it refused, or None."""
  parser = doc_pages.argparse_parser(program)
  if parser is None:
    argv = [name(program)] + args
    values = doc_pages.absl_flags(program, argv)
    try:
      rest = values(argv)
      if 'config' in values:
        values['config'].value.keys()  # pylint: disable=expression-not-assigned
    except Exception as e:  # pylint: disable=broad-except
      return f'{type(e).__name__}: {e}'
    return f'stray arguments {rest[1:]}' if rest[1:] else None
  try:
    parsed = parser.parse_args(args)
  except (Exception, SystemExit) as e:  # pylint: disable=broad-except
    return f'{type(e).__name__}: {e}'
  settings = getattr(parsed, 'product', []) + getattr(parsed, 'zip', []) + getattr(
      parsed, 'set', [])
  if settings:  # experiments/sweep.py: KEY=V1,V2 settings of the config's fields
    overrides = [f'--config.{s.split("=")[0]}={s.split("=", 1)[1].split(",")[0]}'
                 for s in settings]
    return _parse(REPO / 'vdm_jax' / 'main.py', [f'--config={parsed.config}', '--workdir=w']
                  + overrides)
  if getattr(parsed, 'benchmark_args', None):  # experiments/interleave.py
    return _parse(REPO / 'experiments' / 'benchmark.py',
                  [a for a in parsed.benchmark_args if a != '--'])
  return None


def test_every_cited_section_exists():
  sections = _sections()
  assert {'1', '3d', '3.6', '9', '10'} <= sections
  files = [p for d in ('vdm_jax', 'configs', 'experiments', 'tests')
           for p in (REPO / d).rglob('*.py')] + PAGES
  missing = [problem for path in files for problem in _section_problems(path, sections)]
  assert not missing, missing


def test_the_anchor_of_a_heading_is_githubs():
  assert doc_pages.slug('§3d The diffusion term in discrete time (T > 0)') == (
      '3d-the-diffusion-term-in-discrete-time-t--0')
  assert doc_pages.slug('Files of a few images, `configs/digits.py`') == (
      'files-of-a-few-images-configsdigitspy')


def test_every_relative_link_and_anchor_resolves():
  broken = [problem for page in PAGES for problem in _link_problems(page)]
  assert not broken, broken


def test_every_config_file_named_exists():
  files = PAGES + [p for d in ('vdm_jax', 'configs', 'experiments')
                   for p in (REPO / d).rglob('*.py')]
  missing = [problem for path in files for problem in _config_file_problems(path)]
  assert not missing, missing


def test_every_inline_config_field_flag_and_command_exists(monkeypatch):
  monkeypatch.chdir(REPO)  # commands name configs/… from the repository root
  configs = _configs()
  known = set().union(*(doc_pages.flag_names(p) for p in _PROGRAMS))
  missing = [problem for page in PAGES for problem in _inline_problems(page, configs, known)]
  assert not missing, missing


def test_every_command_in_a_shell_block_parses(monkeypatch):
  monkeypatch.chdir(REPO)
  results = [_command_problems(page) for page in PAGES]
  assert sum(seen for seen, _ in results) > 30
  refused = [problem for _, problems in results for problem in problems]
  assert not refused, '\n'.join(refused)


_BAD_PAGE = """# A title

[ok](#a-title), [no heading](#another), [no file](missing.md) and `[code](x.md)`;
docs/maths.md §3d and SECTION99 (the paper's §5.1 is the paper's); `configs/nowhere.py`;
`model.timesteps`, `model.no_field`, `--overwrite`, `--no_flag`, `tfds build --any`;
`python -m vdm_jax.main --config=configs/test.py --workdir=w --mode=nope`.

```bash
python -m vdm_jax.main --config=configs/test.py --workdir=w --config.model.nope=1
python experiments/nowhere.py --flag
```
""".replace('SECTION', '\N{SECTION SIGN}')


def test_a_page_that_names_what_is_not_there_fails_each_check(tmp_path, monkeypatch):
  page = tmp_path / 'bad_page.md'
  page.write_text(_BAD_PAGE)
  monkeypatch.chdir(REPO)
  assert [p.split(': ', 1)[1] for p in _link_problems(page)] == [
      '#another (no such heading)', 'missing.md (no such file)']
  assert [p.split(': ', 1)[1] for p in _section_problems(page, _sections())] == [
      '\N{SECTION SIGN}99']
  assert [p.split(': ', 1)[1] for p in _config_file_problems(page)] == ['configs/nowhere.py']
  known = doc_pages.flag_names(REPO / 'vdm_jax' / 'main.py')
  inline = [p.split(': ', 1)[1] for p in _inline_problems(page, _configs(), known)]
  assert inline[:2] == ['config field model.no_field', 'flag --no_flag'], inline
  assert len(inline) == 3 and 'nope' in inline[2], inline
  seen, refused = _command_problems(page)
  assert seen == 2 and 'nope' in refused[0], refused
  assert 'no program experiments/nowhere.py' in refused[1], refused


@pytest.mark.parametrize('command, refused', [
    ('python -m vdm_jax.main --config=configs/test.py --workdir=w --mode=eval', None),
    ('python -m vdm_jax.main --config=configs/test.py --workdir=w --no_such_flag', 'no_such_flag'),
    ('python -m vdm_jax.main --config=configs/test.py --workdir=w --config.model.no_field=1',
     'no_field'),
    ('python -m vdm_jax.main --config=configs/test.py --workdir=w --mode=evaluate', 'mode'),
    ('python -m vdm_jax.main --config=configs/test.py --workdir=w stray', 'stray'),
    ('python experiments/benchmark.py --config=configs/test.py --nokeep_freed_memory', None),
    ('python experiments/sweep.py --config=configs/test.py --root=r --product seed=0,1', None),
    ('python experiments/sweep.py --config=configs/test.py --root=r --set model.nothing=1',
     'nothing'),
    ('python experiments/interleave.py --base=HEAD -- --config=configs/test.py --skip_it',
     'skip_it'),
])
def test_a_command_that_names_what_is_not_there_is_refused(monkeypatch, command, refused):
  monkeypatch.chdir(REPO)
  [(program, args)] = doc_pages.commands(command)
  why = _parse(program, args)
  assert (why is None) if refused is None else (why is not None and refused in why), why


def _readme_example() -> str:
  text = (REPO / 'README.md').read_text()
  return next(code for language, code, _ in doc_pages.blocks(text) if language == 'python')


@pytest.mark.slow
def test_the_readme_example_runs_as_a_script_outside_the_repository(tmp_path):
  """As a new user runs it: saved in another folder and run from there (the package
  found where a `pip install -e .` of this clone puts it)."""
  script = tmp_path / 'example.py'
  script.write_text(_readme_example() + '\nprint("RESULT", float(out.bpd.mean()), '
                    'int(samples.min()), int(samples.max()))\n')
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  bpd, low, high = result.stdout.split('RESULT')[-1].split()
  # An untrained model: the bound is finite and well above the 1-bit scale of MNIST;
  # samples are integers in [0, V).
  assert 1.0 < float(bpd) < 50.0, result.stdout
  assert 0 <= int(low) <= int(high) < config_base.load_config('mnist').model.vocab_size
