"""Entry point of each launched training process: ``python -m vlmflow.stages.train
JOB.json``."""

from vlmflow.stages.train.jobs import main

main()
