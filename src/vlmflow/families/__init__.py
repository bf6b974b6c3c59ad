"""Model families transformers does not run as shipped, each in a file of its own: the
Meta-format Llama checkpoints (meta_llama) and the InternVL chat models with their remote
code (internvl_chat, remote_code/). A family imports the core only.
"""
