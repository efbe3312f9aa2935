"""pick"""
