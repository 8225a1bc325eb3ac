"""`python -m pipelines.demo [--output URI] [--name NAME] [--scenes N] [--steps N] [--rerun]`, which `make demo`
runs. See `--help` for every option."""

from pipelines.demo.stages import main

if __name__ == "__main__":
    main()
