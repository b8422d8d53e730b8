import sys

if __name__ == "__main__":
    try:  # Ctrl-C while Python loads torch, or a Ctrl-C more while compare stops: one line, not a traceback
        from experiments.compare.cli import main

        code = main()
    except KeyboardInterrupt:
        print("experiments.compare: stopped by SIGINT (finished trials stay in the ledger; the same command "
              "continues)", file=sys.stderr)
        code = 130
    sys.exit(code)
