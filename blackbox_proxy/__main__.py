"""``blackbox-proxy`` as installed (and ``python -m blackbox_proxy``): the product's commands
(:mod:`blackbox_proxy.apps.cli`) and the harness's ``demo`` and ``compare``
(:mod:`blackbox_proxy.harness.commands`), joined here, above both, so that the product never
imports the harness."""

from .apps.cli import main
from .harness.commands import compare, demo

main.add_command(compare)
main.add_command(demo)

if __name__ == "__main__":  # pragma: no cover
    main()
