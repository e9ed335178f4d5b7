"""Providers: one small class per API behind the `Provider` protocol."""

from __future__ import annotations

from agentd.providers.base import Message, Provider, Reply, Request, Usage

__all__ = ["PROVIDER_TYPES", "Message", "Provider", "Reply", "Request", "Usage", "build_provider"]

PROVIDER_TYPES = ("anthropic", "openai", "simulated")


def build_provider(
    provider_name: str,
    provider_type: str,
    *,
    api_key: str | None,
    base_url: str | None,
    timeout_s: float,
) -> Provider:
    """The provider for a configured `type`; its SDK is imported (off the loop) when first used."""
    # The provider modules are imported here, not at the top: `import agentd.providers` must
    # stay cheap (the SDKs take seconds to import and most commands never call a model).
    if provider_type == "anthropic":
        from agentd.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            provider_name, api_key=api_key, base_url=base_url, timeout_s=timeout_s
        )
    if provider_type == "openai":
        from agentd.providers.openai import OpenAIProvider

        return OpenAIProvider(
            provider_name, api_key=api_key, base_url=base_url, timeout_s=timeout_s
        )
    if provider_type == "simulated":
        from agentd.providers.simulated import SimulatedProvider

        return SimulatedProvider(provider_name)
    raise ValueError(
        f"unknown provider type {provider_type!r} (expected one of {', '.join(PROVIDER_TYPES)})"
    )
