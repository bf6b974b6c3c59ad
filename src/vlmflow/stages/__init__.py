"""The pipeline's stages, one module (or package) each: ingest, caption, attributes, h5
(and h5_shuffle), train, evaluate, export, duplicates. Stages meet only through files: a
stage imports the core and the families, never another stage.
"""
