"""dagc.trainer"""
