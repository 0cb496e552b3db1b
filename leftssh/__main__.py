from leftssh.cli import main

main()
