import sys

from rankwise.grid import main

if __name__ == "__main__":
    sys.exit(main())
