"""``conceptexpress ui``: serve the browser app on 127.0.0.1 (optional extra ``[ui]``: ``pip install 'conceptexpress[ui]'``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .edit import add_model_flags, model_config

HELP = "browser app: upload a photo, see and edit its concepts, train, generate, download (needs the [ui] extra)"


def add_parser(subparsers) -> argparse.ArgumentParser:

    p = subparsers.add_parser("ui", help=HELP, description=HELP)

    add_model_flags(p, "the model the page uses, loaded once")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this computer only; 0.0.0.0 exposes the app to your network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--workdir", type=Path, default=Path("outputs") / "ui",
                   help="where the app keeps one run folder per browser session (default outputs/ui)")
    # Unset = StudioConfig's default, applied in `run` (ui.session imports the library, so not at parse time).
    p.add_argument("--max-upload-mb", type=float, default=None,
                   help="largest accepted upload in MB (default: 20, StudioConfig.max_upload_mb)")
    p.add_argument("--example", type=Path, default=None,
                   help="the example photo offered in the page (default: the repository's examples/coffee.jpg)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("`conceptexpress ui` needs gradio: pip install 'conceptexpress[ui]'") from None
    from ..ui.app import build_app
    from ..ui.session import Studio, StudioConfig

    model = model_config(args)
    given = {"max_upload_mb": args.max_upload_mb, "example": args.example}
    config = StudioConfig(model=model, workdir=args.workdir, **{k: v for k, v in given.items() if v is not None})
    studio = Studio(config)
    studio.load()
    app = build_app(studio)
    print(f"conceptexpress ui: model {model.model} loaded; serving on http://{args.host}:{args.port}"
          f"{' (and a public share link)' if args.share else ''}; Ctrl-C stops")
    app.launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False,
               max_file_size=int(config.max_upload_mb * 1e6), show_error=True, **launch_paths(studio))
    return 0


def launch_paths(studio) -> dict:
    """Files gradio may serve besides its own cache: the download zips only (not the runs, no other path)."""
    downloads = (studio.config.workdir / "downloads").resolve()
    downloads.mkdir(parents=True, exist_ok=True)
    return {"allowed_paths": [str(downloads)], "blocked_paths": [str((studio.config.workdir / "runs").resolve())]}
