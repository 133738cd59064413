from sdp_cli.cli import main

main()
