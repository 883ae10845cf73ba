"""Every section of docs/maths.md that the code, tests and documents cite exists."""

import re

import common

_CITE = re.compile(r'§(\d+(?:\.\d+|[a-z])?)')


def _sections() -> set[str]:
  text = (common.REPO / 'docs' / 'maths.md').read_text()
  return set(re.findall(r'^#+ §(\S+)', text, flags=re.M))


def test_every_cited_section_exists():
  sections = _sections()
  assert {'1', '3d', '3.6', '9', '10'} <= sections
  missing = []
  files = [p for d in ('vdm_jax', 'configs', 'experiments', 'tests')
           for p in (common.REPO / d).rglob('*.py')]
  files += [common.REPO / 'README.md', common.REPO / 'BENCHMARKS.md']
  files += list((common.REPO / 'experiments' / 'recipes').glob('*.md'))
  for path in files:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      for cited in _CITE.findall(line):
        if cited not in sections:
          missing.append(f'{path.relative_to(common.REPO)}:{number}: §{cited}')
  assert not missing, missing
