"""The Gradio explorer: a thin layer that renders the engine's events. Nothing below
`explorer.ui` imports Gradio."""
