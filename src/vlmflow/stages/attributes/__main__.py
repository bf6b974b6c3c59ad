"""Entry point of each launched attribute process: ``python -m vlmflow.stages.attributes
JOB.json``."""

from vlmflow.stages.attributes.phases import main

main()
