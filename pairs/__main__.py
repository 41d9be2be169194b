"""Choose balanced DPO pairs from gen runs.  python -m pairs --config configs/demo.yaml pairs.num_pairs=500"""

import sys

from pairs.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
