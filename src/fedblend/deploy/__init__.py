"""Deployment helpers: a loopback SuperLink + SuperNodes (``fedblend deploy``) and dev certs."""
