"""Dataset preparation: downloaded folders -> timelit shards, checked against their manifests.

    timelit data new --name DIGITS --source ~/digits --out my_set         new.py: a manifest set for one's own data
    timelit data prepare --layout imagefolder --source ~/digits --datasets DIGITS --manifests my_set --data_root my_set
    timelit data verify --manifests my_set --data_root my_set             verify.py
    timelit data stream --out my_stream.json --ordering class_incremental  stream_files.py

`prepare` (run.py) reads its settings from one `PrepareOptions` (options.py), lists each split's images with the
module of its source layout (release.py, imagefolder.py, csv_files.py; pools: pool.py), plans the shards of every
split (plans.py) and writes them in worker processes (shard_jobs.py). The runtime pipeline (timelit/data) never
imports this package; the command functions are in timelit/commands/data.py.
"""
