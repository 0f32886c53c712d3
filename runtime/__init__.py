"""dagc.runtime"""
