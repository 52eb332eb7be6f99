"""The quickstart benchmark generator (`timelit data synth`): procedural datasets in the real shard and manifest
format (benchmark.py), the drawings they are made of (draw.py) and the tiny base model trained on their pool
(base_model.py). The runtime pipeline calls it only to build the quickstart cache on a first run.
"""
