"""`python -m gpuctl` runs the CLI."""

from gpuctl.cli.main import run

if __name__ == "__main__":
    run()
