"""``python -m nri_plugin``: the ``nvidia-nri-plugin`` command."""

from nri_plugin.cli import main

raise SystemExit(main())
