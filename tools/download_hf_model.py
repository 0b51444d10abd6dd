#!/usr/bin/env python
"""Download a model's weights, config and tokenizer from the Hugging Face Hub into a plain directory, resumably.

huggingface_hub's `snapshot_download(local_dir=...)` does the work: files already complete in the directory are
skipped (it keeps their hashes under DIR/.cache/huggingface), partial ones resume. Run the same command again after an
interruption. Offline, unauthorised, gated or missing repositories stop with one line and exit status 2.

    python tools/download_hf_model.py --repo_id Qwen/Qwen3-30B-A3B --local_dir checkpoints/Qwen3-30B-A3B
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from framework.checkpoint.cli import UserError, format_bytes, run_cli  # noqa: E402

# Weights, index, config / generation config, tokenizer (json, BPE merges / vocab, sentencepiece, tiktoken), licence
# and model card; not *.bin / *.pth duplicates of the weights, nor images or other repo clutter.
DEFAULT_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "LICENSE*", "*.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo_id", required=True, help="e.g. Qwen/Qwen3-30B-A3B")
    p.add_argument("--local_dir", required=True, help="target directory (created; re-runs resume into it)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--allow_patterns", nargs="+", default=list(DEFAULT_PATTERNS),
                   help=f"glob patterns of files to fetch (default: {' '.join(DEFAULT_PATTERNS)})")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)")
    p.add_argument("--max_workers", type=int, default=8, help="parallel file downloads")
    return p.parse_args(argv)


def _hub_error_message(exc: Exception, args: argparse.Namespace) -> str | None:
    """One line for the Hub errors a user can cause or fix; None for anything else."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo = args.repo_id
    if isinstance(exc, GatedRepoError):
        return (f"{repo} is gated: accept its terms on https://huggingface.co/{repo} and log in (`hf auth login` or "
                "HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo}: repository not found, or not visible to this token (unauthorised? set HF_TOKEN)"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo}: revision {args.revision!r} not found"
    if isinstance(exc, LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return (f"offline (HF_HUB_OFFLINE is set) and {args.local_dir} holds no complete copy of {repo}; "
                    "unset HF_HUB_OFFLINE and run again with network access")
        return f"cannot reach the Hugging Face Hub to download {repo} (no network?); run again to resume"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return f"{repo}: not authorised (HTTP {status}); log in with `hf auth login` or set HF_TOKEN"
        return f"{repo}: Hub request failed: {str(exc).splitlines()[0]}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=args.repo_id, local_dir=args.local_dir, revision=args.revision,
                                 allow_patterns=args.allow_patterns, token=args.token, max_workers=args.max_workers)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below, re-raised if not a Hub error
        message = _hub_error_message(exc, args)
        if message is None:
            raise
        raise UserError(message) from None
    files = [f for f in os.listdir(path) if not f.startswith(".")]
    size = sum(os.path.getsize(os.path.join(path, f)) for f in files if os.path.isfile(os.path.join(path, f)))
    print(f"{args.repo_id}: {len(files)} file(s), {format_bytes(size)} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "download_hf_model"))
