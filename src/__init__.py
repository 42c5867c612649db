"""DDPM on Lightning + Hydra."""

from src.utils.resolvers import register_resolvers

register_resolvers()
