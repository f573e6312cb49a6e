#!/usr/bin/env python
"""``python scripts/merge_shards.py OUT SHARD_RUN_DIR...``: one results folder from shards."""

import json
import sys

from dragexp.merge import merge_shards

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    s = merge_shards(sys.argv[1], sys.argv[2:])
    print(json.dumps({k: v for k, v in s.items() if not isinstance(v, list)}, indent=1))
