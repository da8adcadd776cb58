"""`python -m train COMMAND ...`: the commands are in train/cli/."""

from train.cli import main

if __name__ == "__main__":
    main()
