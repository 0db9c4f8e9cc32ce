"""`python -m gradclip {info,demo,bench,profile}`."""

from __future__ import annotations

import argparse
import platform
import sys

import torch


def info() -> int:
    """Versions, devices, and which backends are available (and why the others are not)."""
    import gradclip
    from gradclip import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"gradclip {gradclip.__version__}")
    print(f"python   {platform.python_version()}")
    print(f"torch    {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton   {triton_version}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"GPU      {gpu}")
    print("backends:")
    for name, status in backends.report().items():
        print(f"  {name:<10} {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradclip")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    sub.add_parser("demo", help="train a small LSTM three ways: no clipping, torch, gradclip", add_help=False)
    sub.add_parser("bench", help="benchmark gradclip against torch", add_help=False)
    sub.add_parser(
        "profile",
        help="what clipping costs in a training step (torch vs gradclip), trace and report",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        return info()
    if args.command == "demo":
        from gradclip import demo

        return demo.main(rest)
    if args.command == "profile":
        from gradclip import profile

        return profile.main(rest)
    from gradclip import bench

    return bench.main(rest)


if __name__ == "__main__":
    sys.exit(main())
