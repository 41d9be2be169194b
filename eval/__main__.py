"""Multi-seed evaluation of a base model and adapters.  python -m eval --config configs/demo.yaml"""

import sys

from eval.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
