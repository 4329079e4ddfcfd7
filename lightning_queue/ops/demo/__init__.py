"""The demo shipped with the package: an agent that needs no LLM, a prompt search over it, the
dataset both use, and ``lightning-queue demo``, which runs them on real worker processes.

``workers/demo_agent.py`` and ``algorithms/prompt_search.py`` in the repository are the entry
points a user copies; the code they run lives here, so the demo works from any install.
"""
