"""train.profile_steps: a tiny training run writes a jax.profiler trace of the chosen steps."""

import glob
import gzip
import json
import os

from test_train import data_dir, run_training  # noqa: F401 (data_dir is a fixture)


def test_profiling_two_steps_writes_a_trace(data_dir, tmp_path):  # noqa: F811
  workdir = str(tmp_path / 'profiled')
  run_training(workdir, data_dir, '--config.train.steps=3', '--config.train.profile_steps=(2,2)')
  runs = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*'))
  assert len(runs) == 1
  assert [os.path.getsize(path) > 0 for path in glob.glob(os.path.join(runs[0], '*.xplane.pb'))
          ] == [True]
  with gzip.open(glob.glob(os.path.join(runs[0], '*.trace.json.gz'))[0]) as f:
    calls = [(event['ts'], event['ts'] + event['dur']) for event in json.load(f)['traceEvents']
             if event.get('name') == 'PjitFunction(train_step)']
  # Each call shows as nested events; the outermost ones are steps 2 and 3 (step 1 compiles).
  outermost = [c for c in calls if not any(o != c and o[0] <= c[0] and c[1] <= o[1]
                                           for o in calls)]
  assert len(outermost) == 2
