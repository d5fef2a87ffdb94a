"""``python -m stages.gateway``: serve the gateway with the settings from the environment."""

from stages.gateway.app import main

if __name__ == "__main__":
    main()
