"""Command-line flags of the extension; the webui calls ``preload(parser)`` before parsing its arguments."""


def preload(parser) -> None:
    parser.add_argument(
        "--ti-trainer-output-dir",
        type=str,
        default=None,
        help="sd-webui-ti-trainer: folder for training runs (checkpoints, previews, loss logs); "
        "default: textual_inversion/ti-trainer inside the webui's data folder",
    )
    parser.add_argument(
        "--ti-trainer-allowed-roots",
        type=str,
        default=None,
        help="sd-webui-ti-trainer: extra folders that API requests may read datasets, templates and embeddings from "
        "(besides the webui's data folder), separated like PATH",
    )
