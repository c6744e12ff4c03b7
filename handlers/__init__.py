"""Telegram adapter: aiogram routers that turn updates into core events; nothing else."""
