"""Oversample completions into Parquet shards.  python -m gen --config configs/demo.yaml gen.n=32"""

import sys

from gen.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
