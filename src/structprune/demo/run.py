"""placeholder"""
DemoConfig = run_demo = None
