"""Optional trainer integrations: `gradclip.integrations.lightning` and `gradclip.integrations.hf`.

Neither is imported by `import gradclip`; each imports its trainer library when it is imported
itself. Pinned versions for CI: requirements-integrations.txt.
"""
