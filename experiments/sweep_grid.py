"""A sweep's grid: axes of config overrides, their points, workdir names, commands.

See experiments/sweep.py for the command line these serve.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex

POINT_FILE = 'sweep_point.json'  # In each point's workdir: its settings.
_MAX_NAME = 150
_UNSAFE = re.compile(r'[^A-Za-z0-9._+=-]')
_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


class SweepError(ValueError):
  """A grid or command line that cannot be swept; the message says why."""


@dataclasses.dataclass(frozen=True)
class Point:
  settings: dict  # Swept key -> value string, in axis order.
  name: str  # Directory name under the root.
  workdir: str



def split_values(text: str) -> list[str]:
  """Splits on commas outside brackets and quotes: '1,(2,3),"a,b"' -> 3 values."""
  values, current, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      values.append(''.join(current))
      current = []
      continue
    current.append(ch)
  if quote or depth:
    raise SweepError(f'Unbalanced brackets or quotes in {text!r}.')
  values.append(''.join(current))
  return values


def parse_setting(spec: str) -> tuple[str, str]:
  """'a.b=value' -> ('a.b', 'value'); the key must be a dotted config path."""
  key, sep, value = spec.partition('=')
  key = key.strip()
  if key.startswith('config.'):
    key = key[len('config.'):]
  if not sep or not _KEY.match(key):
    raise SweepError(f'{spec!r} is not KEY=VALUE with KEY a config path such as '
                     'model.timesteps.')
  return key, value


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """'a.b=v1,v2' -> ('a.b', ['v1', 'v2']); values must be distinct."""
  key, text = parse_setting(spec)
  values = split_values(text)
  if len(set(values)) != len(values):
    raise SweepError(f'Axis {key} repeats a value: {values}.')
  return key, values


def expand_grid(product: list[str], zipped: list[str] = ()) -> list[dict]:
  """Settings of every point: product(product axes..., the zipped group).

  Args:
    product: specs 'KEY=V1,V2,...'; every combination of their values.
    zipped: specs advanced together: point i of the group takes value i of each.
  Returns:
    One {key: value string} per point, keys in the order given, the last product
    axis varying fastest and the zip group innermost.
  """
  axes = [parse_axis(s) for s in product]
  group = [parse_axis(s) for s in zipped]
  keys = [k for k, _ in axes + group]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise SweepError(f'Swept more than once: {", ".join(repeated)}.')
  if group:
    lengths = {k: len(v) for k, v in group}
    if len(set(lengths.values())) > 1:
      raise SweepError('--zip axes need equal numbers of values, got ' + ', '.join(
          f'{k}: {n}' for k, n in lengths.items()) + '.')
    axes.append((None, [dict(zip([k for k, _ in group], vals))
                        for vals in zip(*[v for _, v in group])]))
  points = []
  for combo in itertools.product(*[values for _, values in axes]):
    settings = {}
    for (key, _), value in zip(axes, combo):
      settings.update(value if key is None else {key: value})
    points.append(settings)
  return points


def workdir_name(settings: dict) -> str:
  """A deterministic, filesystem-safe directory name for a point's settings."""
  if not settings:
    return 'base'
  readable = ','.join(f'{k}={settings[k]}' for k in sorted(settings))
  # Commas inside values would make the name ambiguous; '=' in values too.
  parts = [f'{k}={_UNSAFE.sub("_", v.replace("=", "_"))}' for k, v in
           sorted(settings.items())]
  name = ','.join(parts)
  if name != readable or len(name) > _MAX_NAME:
    digest = hashlib.sha1(json.dumps(sorted(settings.items())).encode()).hexdigest()
    name = f'{name[:_MAX_NAME]}-{digest[:10]}'
  return name


def make_points(root: str, grid: list[dict]) -> list[Point]:
  points = [Point(s, workdir_name(s), os.path.join(root, workdir_name(s)))
            for s in grid]
  names = [p.name for p in points]
  if len(set(names)) != len(names):  # Only identical settings can collide.
    raise SweepError('Two points have the same settings.')
  return points


def overrides(settings: dict, fixed: dict) -> list[str]:
  """`--config.KEY=VALUE` arguments: the fixed settings, then the swept ones."""
  return [f'--config.{k}={v}' for k, v in {**fixed, **settings}.items()]


def main_command(python: str, config: str, workdir: str, mode: str,
                 args: list[str]) -> list[str]:
  return [python, '-m', 'vdm_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}'] + args


def load_config(config: str, args: list[str]):
  """The config with the overrides applied, exactly as vdm_jax.main parses them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['sweep', f'--config={config}'] + args
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    cfg = values.config
    cfg.training.num_steps  # pylint: disable=pointless-statement
  except (AttributeError, KeyError) as e:
    field = str(e.args[0] if e.args else e).strip('\'"')
    raise SweepError(f"{config} has no field '{field}' (overrides: "
                     f'{shlex.join(args)}).') from e
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{e} (overrides: {shlex.join(args)}).') from e
  return cfg
