"""Train and evaluate a model: ``python run_recbole_fmrl.py --model=fMRLRec --dataset=mm-sample [--key=value]``."""

import sys

from recbole_fmrl.quick_start import main

if __name__ == "__main__":
    sys.exit(main())
