from megallama.cli import main

main()
