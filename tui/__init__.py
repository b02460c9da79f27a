"""llmtop's viewer: a plain SessionModel fed by a source, and a Textual app rendering it on a timer.

Never imports torch or the agent.
"""
