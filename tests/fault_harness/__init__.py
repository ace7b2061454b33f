"""The fault harness: reliability scenarios on the real command, shared by the tests and the bench.

`tests/test_faults.py` and `tests/test_fuzz.py` run these scenarios with a small, fixed budget;
`bench/faults.py` runs them as a randomized campaign with many more trials and prints the counts
(`campaign.main`). Nothing here imports a test module or the bench, and nothing executes a file by
path: the tests and the bench both import this package.

Modules:
  source         which checkout is under test (the tree, or a snapshot of it) and its device count;
                 imports nothing from r1jax, so the campaign can choose before r1jax is imported.
  command        the tiny pretraining command in a subprocess (`Harness`), fault injection into its
                 batches, and readers of a run's outputs (checkpoints, metrics, bitwise comparison).
  kills          SIGKILL / SIGTERM / second-run interruptions of one workdir; stale-lock races.
  corruption     damage to one file of a checkpoint, restored in-process or rerun end to end.
  bad_inputs     NaN / out-of-vocabulary batches, and invalid command-line overrides.
  hostile_input  hypothesis strategies of hostile text and bytes, and the checks run on them.
  campaign       the randomized campaign and its summary (`bench/faults.py` is its command line).
"""
